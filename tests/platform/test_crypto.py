"""Field encryption, blind indexes and key derivation, tested against public vectors
(Wycheproof, RFC 4231, RFC 5869) as well as against their own promises."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soko.platform.crypto import (
    BLIND_INDEX_KEY_LABEL,
    ENCRYPTION_KEY_LABEL,
    BlindIndex,
    DataKeys,
    DecryptionError,
    KeyConfigError,
    Keyring,
    MacAlgorithm,
    aes_gcm_open,
    aes_gcm_seal,
    canonical_email,
    canonical_phone,
    derive_keys,
    digests_match,
    hkdf_sha256,
    mac,
    mac_matches,
    new_key_spec,
)

from . import vectors

# -- public vectors: AES-GCM ----------------------------------------------------------------

AES_256_CASES = vectors.aes_gcm_cases(key_bits=256)
AES_256_96 = [case for case in AES_256_CASES if len(case.iv) == 12]
AES_256_OTHER_IV = [case for case in AES_256_CASES if len(case.iv) != 12]


def test_wycheproof_aes_gcm_groups_are_all_there() -> None:
    # A trimmed or damaged vector file must not quietly shrink the suite.
    assert len(AES_256_96) == 66
    assert sum(not case.valid for case in AES_256_96) > 0
    assert len(AES_256_OTHER_IV) == 39
    assert {len(case.iv) for case in AES_256_OTHER_IV} >= {0, 8, 16}


@pytest.mark.parametrize("case", AES_256_96, ids=lambda case: case.id)
def test_wycheproof_aes_256_gcm_96_bit_iv_verdict(case: vectors.AeadCase) -> None:
    sealed = case.ct + case.tag
    if case.valid:
        assert aes_gcm_open(case.key, case.iv, sealed, case.aad) == case.msg
        assert aes_gcm_seal(case.key, case.iv, case.msg, case.aad) == sealed
    else:
        with pytest.raises(DecryptionError):
            aes_gcm_open(case.key, case.iv, sealed, case.aad)


@pytest.mark.parametrize("case", AES_256_OTHER_IV, ids=lambda case: case.id)
def test_wycheproof_aes_gcm_other_iv_sizes_are_refused(case: vectors.AeadCase) -> None:
    # By design, even the cases Wycheproof calls valid: only 96-bit nonces are accepted.
    with pytest.raises(DecryptionError, match="nonce"):
        aes_gcm_open(case.key, case.iv, case.ct + case.tag, case.aad)
    with pytest.raises(ValueError, match="nonce"):
        aes_gcm_seal(case.key, case.iv, case.msg, case.aad)


@pytest.mark.parametrize("key_bytes", [16, 24, 31, 33])
def test_aes_gcm_refuses_keys_that_are_not_256_bits(key_bytes: int) -> None:
    key = bytes(range(key_bytes))
    with pytest.raises(DecryptionError, match="256-bit"):
        aes_gcm_open(key, bytes(12), bytes(32), b"")
    with pytest.raises(ValueError, match="32 bytes"):
        aes_gcm_seal(key, bytes(12), b"x", b"")
    with pytest.raises(KeyConfigError):
        Keyring({"k1": key}, active="k1")


def test_aes_gcm_open_refuses_input_shorter_than_a_tag() -> None:
    with pytest.raises(DecryptionError, match="shorter"):
        aes_gcm_open(bytes(32), bytes(12), bytes(15), b"")


# -- public vectors: HMAC -------------------------------------------------------------------

HMAC_SHA256_CASES = vectors.hmac_cases("hmac_sha256_test.json")
HMAC_SHA512_CASES = vectors.hmac_cases("hmac_sha512_test.json")


def test_wycheproof_hmac_files_are_complete() -> None:
    assert len(HMAC_SHA256_CASES) == 174
    assert len(HMAC_SHA512_CASES) == 174
    assert {case.tag_bytes for case in HMAC_SHA256_CASES} == {16, 32}
    assert {case.tag_bytes for case in HMAC_SHA512_CASES} == {32, 64}


def _check_mac_case(case: vectors.MacCase, algorithm: MacAlgorithm) -> None:
    # Truncated-tag groups are run with the tag size the verifier expects, as a caller
    # that agreed on truncation would; the sender never chooses it.
    verdict = mac_matches(
        case.key, case.msg, case.tag, algorithm=algorithm, tag_bytes=case.tag_bytes
    )
    assert verdict is case.valid
    if case.valid:
        assert mac(case.key, case.msg, algorithm=algorithm, tag_bytes=case.tag_bytes) == case.tag


@pytest.mark.parametrize("case", HMAC_SHA256_CASES, ids=lambda case: case.id)
def test_wycheproof_hmac_sha256_verdict(case: vectors.MacCase) -> None:
    _check_mac_case(case, MacAlgorithm.sha256)


@pytest.mark.parametrize("case", HMAC_SHA512_CASES, ids=lambda case: case.id)
def test_wycheproof_hmac_sha512_verdict(case: vectors.MacCase) -> None:
    _check_mac_case(case, MacAlgorithm.sha512)


def test_truncated_tag_is_refused_unless_the_verifier_asked_for_it() -> None:
    valid_full = next(c for c in HMAC_SHA256_CASES if c.valid and c.tag_bytes == 32)
    assert mac_matches(valid_full.key, valid_full.msg, valid_full.tag)
    for size in (0, 1, 16, 31):
        assert not mac_matches(valid_full.key, valid_full.msg, valid_full.tag[:size])
    assert not mac_matches(valid_full.key, valid_full.msg, valid_full.tag + b"\x00")


@pytest.mark.parametrize("tag_bytes", [0, 8, 15, 33])
def test_mac_refuses_tag_sizes_outside_16_to_digest_length(tag_bytes: int) -> None:
    with pytest.raises(ValueError, match="tag_bytes"):
        mac(b"k" * 32, b"m", tag_bytes=tag_bytes)


@pytest.mark.parametrize("case", vectors.rfc_vectors("rfc4231"), ids=lambda case: case["name"])
def test_rfc4231_hmac(case: dict[str, str]) -> None:
    key = bytes.fromhex(case["key_hex"]) if "key_hex" in case else case["key_ascii"].encode()
    data = case["data_ascii"].encode()
    for name, algorithm in (("sha256", MacAlgorithm.sha256), ("sha512", MacAlgorithm.sha512)):
        if name in case:
            expected = bytes.fromhex(case[name])
            assert mac(key, data, algorithm=algorithm) == expected
            assert mac_matches(key, data, expected, algorithm=algorithm)
            assert digests_match(expected.hex(), case[name])


def test_digests_match_compares_text_and_bytes() -> None:
    assert digests_match("abc123", "abc123")
    assert not digests_match("abc123", "abc124")
    assert not digests_match("abc123", "abc12")
    assert not digests_match(b"abc", "ab\u00e9")
    assert not digests_match("ab?", "ab\u00e9")


@pytest.mark.parametrize("case", vectors.rfc_vectors("rfc5869"), ids=lambda case: case["name"])
def test_rfc5869_hkdf_sha256(case: dict[str, object]) -> None:
    okm = hkdf_sha256(
        bytes.fromhex(str(case["ikm_hex"])),
        salt=bytes.fromhex(str(case["salt_hex"])),
        info=bytes.fromhex(str(case["info_hex"])),
        length=int(str(case["length"])),
    )
    assert okm.hex() == case["okm_hex"]


# -- vector sources -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["aes_gcm_test.json", "hmac_sha256_test.json", "hmac_sha512_test.json"]
)
def test_vendored_wycheproof_is_a_faithful_copy(name: str) -> None:
    if not (vectors.SHARED_VECTORS_DIR / "wycheproof" / name).is_file():
        pytest.skip("the shared vector directory is not beside this repository")
    shared = vectors.wycheproof_file(name, vectors.SHARED_VECTORS_DIR)
    vendored = vectors.wycheproof_file(name, vectors.VENDORED_DIR)
    assert vendored["algorithm"] == shared["algorithm"]
    remaining = list(shared["testGroups"])
    for group in vendored["testGroups"]:
        assert group in remaining, "a vendored group differs from the published one"
        remaining.remove(group)
    if name != "aes_gcm_test.json":
        assert remaining == []
    assert vendored["numberOfTests"] == sum(len(g["tests"]) for g in vendored["testGroups"])


def test_vectors_dir_honours_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vectors.ENV_VAR, str(vectors.VENDORED_DIR))
    assert vectors.vectors_dir() == vectors.VENDORED_DIR
    assert (vectors.VENDORED_DIR / "wycheproof" / "LICENSE").is_file()


# -- keyring --------------------------------------------------------------------------------

KEY_1 = bytes(range(32))
KEY_2 = bytes(range(100, 132))
CONTEXT = "users.email:0190a1b2-0000-7000-8000-000000000001"
KEYRING = Keyring({"k2": KEY_2, "k1": KEY_1}, active="k2")
TOKEN = KEYRING.encrypt("ada@example.com", context=CONTEXT)
TOKEN_SHAPE = re.compile(r"v1\.k2\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]+")


@given(plaintext=st.text(), context=st.text(min_size=1))
def test_round_trip(plaintext: str, context: str) -> None:
    token = KEYRING.encrypt(plaintext, context=context)
    assert KEYRING.decrypt(token, context=context) == plaintext


def test_ciphertext_is_self_describing_ascii() -> None:
    assert TOKEN_SHAPE.fullmatch(TOKEN)
    _, key_id, nonce, sealed = TOKEN.split(".")
    assert key_id == "k2"
    assert len(base64.urlsafe_b64decode(nonce + "==")) == 12
    # 15 bytes of plaintext plus the 16-byte tag.
    assert len(base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))) == 31
    assert "ada" not in TOKEN


def test_every_encryption_draws_a_fresh_nonce() -> None:
    tokens = {KEYRING.encrypt("same", context=CONTEXT) for _ in range(50)}
    assert len(tokens) == 50
    assert len({token.split(".")[2] for token in tokens}) == 50


def test_ciphertext_format_stays_readable() -> None:
    # Made with KEY_1 and nonce 00 01 .. 0b by this module's first version: stored data
    # must keep decrypting after any later change to the code.
    pinned = "v1.k1.AAECAwQFBgcICQoL.Jma3W6Cdo3b9LfKl0oYV8G95hnWcdIZm8UXYnD8aAw"
    keyring = Keyring({"k1": KEY_1}, active="k1")
    assert keyring.decrypt(pinned, context=CONTEXT) == "ada@example.com"
    assert not keyring.needs_rotation(pinned)


def test_old_key_still_decrypts_after_rotation() -> None:
    old = Keyring({"k1": KEY_1}, active="k1")
    stored = old.encrypt("+254700000001", context="users.phone:7")
    rotated = Keyring({"k2": KEY_2, "k1": KEY_1}, active="k2")
    assert rotated.decrypt(stored, context="users.phone:7") == "+254700000001"
    assert rotated.needs_rotation(stored)
    assert not old.needs_rotation(stored)

    fresh = rotated.rotate(stored, context="users.phone:7")
    assert fresh.startswith("v1.k2.")
    assert not rotated.needs_rotation(fresh)
    assert rotated.decrypt(fresh, context="users.phone:7") == "+254700000001"
    assert rotated.rotate(fresh, context="users.phone:7") == fresh
    with pytest.raises(DecryptionError, match="does not hold"):
        old.decrypt(fresh, context="users.phone:7")


def test_key_removed_from_the_keyring_no_longer_decrypts() -> None:
    stored = Keyring({"k1": KEY_1}, active="k1").encrypt("x", context=CONTEXT)
    only_new = Keyring({"k2": KEY_2}, active="k2")
    with pytest.raises(DecryptionError, match="does not hold"):
        only_new.decrypt(stored, context=CONTEXT)
    with pytest.raises(DecryptionError, match="does not hold"):
        only_new.needs_rotation(stored)


def test_same_key_id_with_other_key_material_fails() -> None:
    impostor = Keyring({"k2": KEY_1}, active="k2")
    with pytest.raises(DecryptionError, match="authentication"):
        impostor.decrypt(TOKEN, context=CONTEXT)


@pytest.mark.parametrize(
    "other_context",
    [
        "users.email:0190a1b2-0000-7000-8000-000000000002",  # another row
        "users.phone:0190a1b2-0000-7000-8000-000000000001",  # another column
        "users.email:",
        "",
        CONTEXT + " ",
    ],
)
def test_ciphertext_is_bound_to_its_context(other_context: str) -> None:
    with pytest.raises(DecryptionError, match="authentication"):
        KEYRING.decrypt(TOKEN, context=other_context)


def test_key_id_is_authenticated() -> None:
    # The same key under two ids: moving a value between ids must still fail.
    keyring = Keyring({"a": KEY_1, "b": KEY_1}, active="a")
    token = keyring.encrypt("x", context=CONTEXT)
    relabelled = token.replace("v1.a.", "v1.b.", 1)
    with pytest.raises(DecryptionError, match="authentication"):
        keyring.decrypt(relabelled, context=CONTEXT)


SUBSTITUTES = string.ascii_letters + string.digits + "-_.=+/ \x00é"


@pytest.mark.parametrize("position", range(len(TOKEN)))
def test_every_character_of_the_token_is_protected(position: int) -> None:
    for substitute in SUBSTITUTES:
        if substitute == TOKEN[position]:
            continue
        tampered = TOKEN[:position] + substitute + TOKEN[position + 1 :]
        with pytest.raises(DecryptionError):
            KEYRING.decrypt(tampered, context=CONTEXT)
    with pytest.raises(DecryptionError):
        KEYRING.decrypt(TOKEN[:position] + TOKEN[position + 1 :], context=CONTEXT)


def test_every_bit_of_nonce_and_ciphertext_is_protected() -> None:
    version, key_id, nonce_text, sealed_text = TOKEN.split(".")
    raw = base64.urlsafe_b64decode(nonce_text + "==") + base64.urlsafe_b64decode(
        sealed_text + "=" * (-len(sealed_text) % 4)
    )
    flips = 0
    for index in range(len(raw)):
        for bit in range(8):
            changed = bytearray(raw)
            changed[index] ^= 1 << bit
            nonce, sealed = bytes(changed[:12]), bytes(changed[12:])
            tampered = ".".join(
                (
                    version,
                    key_id,
                    base64.urlsafe_b64encode(nonce).rstrip(b"=").decode(),
                    base64.urlsafe_b64encode(sealed).rstrip(b"=").decode(),
                )
            )
            with pytest.raises(DecryptionError, match="authentication"):
                KEYRING.decrypt(tampered, context=CONTEXT)
            flips += 1
    assert flips == 8 * (12 + 15 + 16)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tampering_anywhere_is_detected(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(TOKEN) - 1), label="position")
    replacement = data.draw(
        st.text(min_size=1, max_size=3).filter(lambda text: text != TOKEN[position]),
        label="replacement",
    )
    tampered = TOKEN[:position] + replacement + TOKEN[position + 1 :]
    with pytest.raises(DecryptionError):
        KEYRING.decrypt(tampered, context=CONTEXT)


@pytest.mark.parametrize("length", range(len(TOKEN)))
def test_every_truncation_is_refused(length: int) -> None:
    with pytest.raises(DecryptionError):
        KEYRING.decrypt(TOKEN[:length], context=CONTEXT)


@pytest.mark.parametrize("suffix", ["A", "AA", "AAA", "AAAA", "=", "==", ".", ".x", "\n"])
def test_extended_tokens_are_refused(suffix: str) -> None:
    with pytest.raises(DecryptionError):
        KEYRING.decrypt(TOKEN + suffix, context=CONTEXT)


def test_non_canonical_base64_is_refused() -> None:
    # 31 sealed bytes leave 4 unused bits in the last character; setting them must not
    # produce a second spelling of the same ciphertext.
    version, key_id, nonce_text, sealed_text = TOKEN.split(".")
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    last = alphabet.index(sealed_text[-1])
    for low_bits in range(1, 16):
        variant = sealed_text[:-1] + alphabet[last ^ low_bits]
        with pytest.raises(DecryptionError):
            KEYRING.decrypt(".".join((version, key_id, nonce_text, variant)), context=CONTEXT)


@pytest.mark.parametrize(
    "token",
    ["", "v1", "v1.k2", "v1.k2.AAAA", "v2" + TOKEN[2:], TOKEN.replace(".", ":"), "v1..x.y"],
    # Fixed ids: TOKEN is random per process, and parallel workers must collect alike.
    ids=["empty", "version-only", "no-nonce", "no-ciphertext", "v2", "colons", "empty-kid"],
)
def test_malformed_tokens_raise_decryption_error(token: str) -> None:
    with pytest.raises(DecryptionError):
        KEYRING.decrypt(token, context=CONTEXT)
    with pytest.raises(DecryptionError):
        KEYRING.needs_rotation(token)


def test_decryption_error_reveals_nothing() -> None:
    secret_value = "grace.hopper@example.com"
    token = KEYRING.encrypt(secret_value, context=CONTEXT)
    failures = []
    for attempt in (
        lambda: KEYRING.decrypt(token, context="users.email:other"),
        lambda: KEYRING.decrypt(token[:-2], context=CONTEXT),
        lambda: Keyring({"k2": KEY_1}, active="k2").decrypt(token, context=CONTEXT),
        lambda: Keyring({"k9": KEY_1}, active="k9").decrypt(token, context=CONTEXT),
    ):
        with pytest.raises(DecryptionError) as caught:
            attempt()
        failures.append(caught.value)
    forbidden = [
        secret_value,
        "grace",
        CONTEXT,
        token,
        token.split(".")[3],
        KEY_1.hex(),
        KEY_2.hex(),
        base64.b64encode(KEY_1).decode(),
        base64.urlsafe_b64encode(KEY_2).decode().rstrip("="),
    ]
    for failure in failures:
        shown = f"{failure!s} {failure!r} {failure.args!r}"
        for text in forbidden:
            assert text not in shown
        assert failure.__cause__ is None
        assert failure.__context__ is None or failure.__suppress_context__


def test_keyring_repr_shows_ids_not_keys() -> None:
    shown = repr(KEYRING)
    assert "k1" in shown and "k2" in shown
    assert KEY_1.hex() not in shown and repr(KEY_1) not in shown


# -- keyring configuration ------------------------------------------------------------------


def _b64(key: bytes, *, urlsafe: bool = False) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(key).decode()


def test_keyring_from_config_makes_the_first_key_active() -> None:
    keyring = Keyring.from_config(f" k2:{_b64(KEY_2, urlsafe=True).rstrip('=')} , k1:{_b64(KEY_1)}")
    assert keyring.active_key_id == "k2"
    assert keyring.key_ids == ("k2", "k1")
    stored = Keyring({"k1": KEY_1}, active="k1").encrypt("x", context=CONTEXT)
    assert keyring.decrypt(stored, context=CONTEXT) == "x"
    assert keyring.decrypt(TOKEN, context=CONTEXT) == "ada@example.com"


def test_new_key_spec_is_accepted_by_from_config() -> None:
    keyring = Keyring.from_config(new_key_spec("2026-01") + "," + new_key_spec("2025-06"))
    assert keyring.active_key_id == "2026-01"
    token = keyring.encrypt("x", context=CONTEXT)
    assert keyring.decrypt(token, context=CONTEXT) == "x"


SHORT_KEY = _b64(bytes(range(200, 231)))  # 31 bytes


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no encryption key"),
        (" , ", "no encryption key"),
        (_b64(KEY_1), "<key id>:<base64 key>"),
        (f"k1:{SHORT_KEY}", "32 bytes, not 31"),
        ("k1:not base64!", "not valid base64"),
        (f"k1:{_b64(KEY_1)},k1:{_b64(KEY_2)}", "twice"),
        (f"bad id:{_b64(KEY_1)}", "key id"),
        (f"k.1:{_b64(KEY_1)}", "key id"),
        (f"{'k' * 33}:{_b64(KEY_1)}", "key id"),
    ],
)
def test_keyring_from_config_errors_never_echo_keys(spec: str, message: str) -> None:
    with pytest.raises(KeyConfigError, match=re.escape(message)) as caught:
        Keyring.from_config(spec)
    for fragment in (SHORT_KEY, _b64(KEY_1), _b64(KEY_2), "not base64!"):
        assert fragment not in str(caught.value)


def test_keyring_construction_checks() -> None:
    with pytest.raises(KeyConfigError, match="at least one"):
        Keyring({}, active="k1")
    with pytest.raises(KeyConfigError, match="active key id"):
        Keyring({"k1": KEY_1}, active="k2")


# -- blind index ----------------------------------------------------------------------------

INDEX_KEY = bytes(range(50, 82))


def test_blind_index_is_the_documented_hmac() -> None:
    index = BlindIndex(INDEX_KEY)
    expected = hmac.new(INDEX_KEY, b"users.email\x00ada@example.com", hashlib.sha256)
    assert index.compute("users.email", "ada@example.com") == expected.hexdigest()
    url = BlindIndex(INDEX_KEY, encoding="base64url").compute("users.email", "ada@example.com")
    assert url == base64.urlsafe_b64encode(expected.digest()).rstrip(b"=").decode()
    assert len(url) == 43


def test_blind_index_is_deterministic_and_matches_in_constant_time() -> None:
    index = BlindIndex(INDEX_KEY)
    stored = index.compute("users.email", "ada@example.com")
    assert index.compute("users.email", "ada@example.com") == stored
    assert index.matches("users.email", "ada@example.com", stored)
    assert not index.matches("users.email", "ada@example.org", stored)
    assert not index.matches("users.email", "ada@example.com", stored[:-1])
    assert not index.matches("users.email", "ada@example.com", stored.upper())


def test_blind_index_differs_per_column_for_the_same_value() -> None:
    index = BlindIndex(INDEX_KEY)
    value = "+254700000001"
    digests = {
        index.compute(column, value)
        for column in ("users.phone", "users.email", "sellers.phone", "users.phone_backup")
    }
    assert len(digests) == 4
    assert not index.matches("users.email", value, index.compute("users.phone", value))


def test_blind_index_depends_on_its_key() -> None:
    other = BlindIndex(bytes(32))
    assert BlindIndex(INDEX_KEY).compute("users.email", "a@b.c") != other.compute(
        "users.email", "a@b.c"
    )


@pytest.mark.parametrize("column", ["email", "Users.email", "users.", ".email", "users.e mail"])
def test_blind_index_column_must_be_table_dot_column(column: str) -> None:
    with pytest.raises(ValueError, match=r"table\.column"):
        BlindIndex(INDEX_KEY).compute(column, "x")


def test_blind_index_key_must_be_32_bytes() -> None:
    with pytest.raises(KeyConfigError, match="32 bytes"):
        BlindIndex(bytes(16))
    with pytest.raises(KeyConfigError, match="32 bytes"):
        BlindIndex.from_config(SHORT_KEY)
    assert repr(BlindIndex(INDEX_KEY)) == "BlindIndex(encoding='hex')"


def test_blind_index_is_stable_across_encryption_key_rotation() -> None:
    master = b"m" * 48
    before = derive_keys(master, key_ids=["d1"])
    after = derive_keys(master, key_ids=["d2", "d1"])
    assert after.keyring.active_key_id == "d2"
    value = canonical_email("Ada@Example.com")
    assert before.blind_index.compute("users.email", value) == after.blind_index.compute(
        "users.email", value
    )
    stored = before.keyring.encrypt(value, context=CONTEXT)
    assert after.keyring.needs_rotation(stored)
    rotated = after.keyring.rotate(stored, context=CONTEXT)
    assert after.keyring.decrypt(rotated, context=CONTEXT) == value


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("  Ada.Lovelace+shop@Example.COM \n", "ada.lovelace+shop@example.com"),
        ("ADA@EXAMPLE.COM", "ada@example.com"),
        ("ada@example.com", "ada@example.com"),
        ('"a@b"@example.com', '"a@b"@example.com'),
        ("Zoë@Bücher.DE", "zoë@bücher.de"),
        ("Zoe\u0308@example.com", "zo\u00eb@example.com"),  # NFC
    ],
)
def test_canonical_email(raw: str, canonical: str) -> None:
    assert canonical_email(raw) == canonical
    assert canonical_email(canonical) == canonical


@pytest.mark.parametrize("raw", ["", "ada", "@example.com", "ada@", "ada @example.com", "  "])
def test_canonical_email_refuses_non_addresses(raw: str) -> None:
    with pytest.raises(ValueError, match="not an email address"):
        canonical_email(raw)


def test_canonical_email_gives_one_index_for_spellings_of_one_address() -> None:
    index = BlindIndex(INDEX_KEY)
    digests = {
        index.compute("users.email", canonical_email(raw))
        for raw in ("ada@example.com", " ADA@Example.Com", "Ada@EXAMPLE.com\t")
    }
    assert len(digests) == 1


@pytest.mark.parametrize(
    ("raw", "canonical"), [("+254700000001", "+254700000001"), (" +14155550100 ", "+14155550100")]
)
def test_canonical_phone_keeps_e164_as_given(raw: str, canonical: str) -> None:
    assert canonical_phone(raw) == canonical


@pytest.mark.parametrize(
    "raw", ["254700000001", "+0254700000001", "+2547 0000 0001", "+1234567890123456", "+", ""]
)
def test_canonical_phone_refuses_other_forms(raw: str) -> None:
    with pytest.raises(ValueError, match=r"E\.164"):
        canonical_phone(raw)


# -- key derivation -------------------------------------------------------------------------

MASTER = b"test-secret-key-that-is-long-enough-0123456789"


def _rfc5869_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """An independent HKDF (RFC 5869 §2.2-2.3) on the standard library, salt omitted."""
    prk = hmac.digest(b"\x00" * 32, ikm, "sha256")
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        okm += block
        counter += 1
    return okm[:length]


def test_derived_keys_follow_the_documented_labels() -> None:
    keys = derive_keys(MASTER, key_ids=["d2", "d1"])
    for key_id in ("d2", "d1"):
        key = _rfc5869_sha256(MASTER, (ENCRYPTION_KEY_LABEL + key_id).encode())
        explicit = Keyring({key_id: key}, active=key_id)
        token = explicit.encrypt("x", context=CONTEXT)
        assert keys.keyring.decrypt(token, context=CONTEXT) == "x"
    blind_key = _rfc5869_sha256(MASTER, BLIND_INDEX_KEY_LABEL.encode())
    assert keys.blind_index.compute("users.email", "a@b.c") == BlindIndex(blind_key).compute(
        "users.email", "a@b.c"
    )


def test_derived_keys_are_pinned() -> None:
    # Changing a label or the KDF would make every stored value unreadable: these are
    # the values the first version derived for MASTER.
    assert _rfc5869_sha256(MASTER, b"soko/field-encryption/v1/d1").hex() == (
        "d5e8956e8ce2dfcecd4f50a5cd30775248c0c2a2635307f0911ba697e2332079"
    )
    assert _rfc5869_sha256(MASTER, b"soko/blind-index/v1").hex() == (
        "454c86d4531fcb5418344f949abc038fa3775fc752a389b5e957a36f0ecd9508"
    )
    assert derive_keys(MASTER).blind_index.compute("users.email", "a@b.c") == (
        "36c5292fce28e0a770e2de7445d702df5b03a89726b81866b3454ecbb920503b"
    )


def test_derived_keys_are_distinct() -> None:
    keys = {
        _rfc5869_sha256(MASTER, (ENCRYPTION_KEY_LABEL + "d1").encode()),
        _rfc5869_sha256(MASTER, (ENCRYPTION_KEY_LABEL + "d2").encode()),
        _rfc5869_sha256(MASTER, BLIND_INDEX_KEY_LABEL.encode()),
        _rfc5869_sha256(MASTER + b"!", BLIND_INDEX_KEY_LABEL.encode()),
    }
    assert len(keys) == 4
    other_master = derive_keys(MASTER + b"!")
    token = derive_keys(MASTER).keyring.encrypt("x", context=CONTEXT)
    with pytest.raises(DecryptionError, match="authentication"):
        other_master.keyring.decrypt(token, context=CONTEXT)


def test_derive_keys_refuses_a_short_master_secret() -> None:
    with pytest.raises(KeyConfigError, match="at least 32 bytes"):
        derive_keys(b"x" * 31)
    with pytest.raises(KeyConfigError, match="at least one key id"):
        derive_keys(MASTER, key_ids=[])


def test_data_keys_from_config_prefers_explicit_keys() -> None:
    spec = f"k1:{_b64(KEY_1)}"
    explicit = DataKeys.from_config(
        master_secret=None, encryption_keys=spec, blind_index_key=_b64(INDEX_KEY)
    )
    assert explicit.keyring.key_ids == ("k1",)
    assert explicit.blind_index.compute("users.email", "a@b.c") == BlindIndex(INDEX_KEY).compute(
        "users.email", "a@b.c"
    )

    mixed = DataKeys.from_config(master_secret=MASTER, encryption_keys=spec)
    assert mixed.keyring.key_ids == ("k1",)
    assert mixed.blind_index.compute("users.email", "a@b.c") == derive_keys(
        MASTER
    ).blind_index.compute("users.email", "a@b.c")

    derived = DataKeys.from_config(master_secret=MASTER)
    assert derived.keyring.key_ids == ("d1",)
    token = derive_keys(MASTER).keyring.encrypt("x", context=CONTEXT)
    assert derived.keyring.decrypt(token, context=CONTEXT) == "x"


def test_data_keys_from_config_needs_a_source_for_every_key() -> None:
    with pytest.raises(KeyConfigError, match="no master secret"):
        DataKeys.from_config(master_secret=None, encryption_keys=f"k1:{_b64(KEY_1)}")
    with pytest.raises(KeyConfigError, match="no master secret"):
        DataKeys.from_config(master_secret=None)


def test_rfc_vector_file_names_its_sources() -> None:
    data = json.loads((vectors.VENDORED_DIR / "rfc_vectors.json").read_text())
    assert "RFC 4231" in data["rfc4231"]["source"]
    assert "RFC 5869" in data["rfc5869"]["source"]
