"""Access tokens: issue, verify, rotation, JWKS, and public vectors (RFC 7515, RFC 8037,
Wycheproof). Pure functions of their inputs: no database, so no backend parametrisation."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from soko.platform import tokens as tokens_module
from soko.platform.clock import ManualClock
from soko.platform.tokens import (
    SIGNING_KEYS_FILE,
    InvalidToken,
    KeyRing,
    TokenKey,
    TokenRejection,
    load_or_create_keyring,
    save_keyring,
)
from tests.platform.together import answers_of_processes_released_together

DATA = Path(__file__).resolve().parent.parent / "data" / "jws"
ISSUER = "https://market.example"
AUDIENCE = "soko-api"
START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_raw(key: TokenKey, header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes) -> str:
    """A compact JWS with exactly the header and payload given, signed by ``key``."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    payload_bytes = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64url(header_bytes)}.{b64url(payload_bytes)}".encode("ascii")
    private = key.private_key
    if isinstance(private, Ed25519PrivateKey):
        signature = private.sign(signing_input)
    else:
        raise AssertionError("sign_raw signs with Ed25519 keys only")
    return f"{signing_input.decode()}.{b64url(signature)}"


def claims_at(moment: dt.datetime, **overrides: Any) -> dict[str, Any]:
    now = int(moment.timestamp())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "buyer-1",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "j-1",
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate()


def issue(ring: KeyRing, clock: ManualClock, **kwargs: Any) -> str:
    arguments: dict[str, Any] = {
        "ttl": dt.timedelta(minutes=5),
        "clock": clock,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "subject": "buyer-1",
    }
    arguments.update(kwargs)
    claims = arguments.pop("claims", {"scope": "orders:read"})
    return ring.issue(claims, **arguments)


def verify(ring: KeyRing, token: str, clock: ManualClock, **kwargs: Any) -> Any:
    arguments: dict[str, Any] = {"audience": AUDIENCE, "issuer": ISSUER, "clock": clock}
    arguments.update(kwargs)
    return ring.verify(token, **arguments)


def rejection(ring: KeyRing, token: str, clock: ManualClock, **kwargs: Any) -> TokenRejection:
    with pytest.raises(InvalidToken) as caught:
        verify(ring, token, clock, **kwargs)
    return caught.value.reason


# -- issue and verify --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_issued_token_has_the_header_and_claims_asked_for(alg: str, clock: ManualClock) -> None:
    ring = KeyRing.generate(alg)  # type: ignore[arg-type]
    token = issue(ring, clock, jti="jti-42")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": ring.active.kid, "typ": "at+jwt"}

    verified = verify(ring, token, clock)
    now = int(START.timestamp())
    assert verified.claims == {
        "scope": "orders:read",
        "iss": ISSUER,
        "sub": "buyer-1",
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "jti-42",
    }
    assert verified.kid == ring.active.kid
    assert verified.subject == "buyer-1"
    assert verified.audience == (AUDIENCE,)
    assert verified.issued_at == START
    assert verified.expires_at == START + dt.timedelta(minutes=5)


def test_generated_jti_is_unique_and_plain_jwt_type_is_supported(
    ring: KeyRing, clock: ManualClock
) -> None:
    first, second = issue(ring, clock), issue(ring, clock)
    assert verify(ring, first, clock).jti != verify(ring, second, clock).jti

    id_token = issue(ring, clock, token_type="JWT")
    assert jwt.get_unverified_header(id_token)["typ"] == "JWT"
    assert verify(ring, id_token, clock, token_type="JWT").subject == "buyer-1"
    # A token of one type is never accepted as the other (RFC 8725 section 3.11).
    assert rejection(ring, id_token, clock) is TokenRejection.wrong_type
    assert rejection(ring, first, clock, token_type="JWT") is TokenRejection.wrong_type


def test_media_type_spelling_of_typ_is_accepted(ring: KeyRing, clock: ManualClock) -> None:
    token = sign_raw(
        ring.active,
        {"alg": "EdDSA", "kid": ring.active.kid, "typ": "application/AT+JWT"},
        claims_at(START),
    )
    assert verify(ring, token, clock).subject == "buyer-1"
    untyped = sign_raw(ring.active, {"alg": "EdDSA", "kid": ring.active.kid}, claims_at(START))
    assert rejection(ring, untyped, clock) is TokenRejection.wrong_type


def test_several_audiences_verify_for_each_and_not_for_others(
    ring: KeyRing, clock: ManualClock
) -> None:
    token = issue(ring, clock, audience=["soko-api", "soko-admin"])
    assert verify(ring, token, clock, audience="soko-admin").audience == (
        "soko-api",
        "soko-admin",
    )
    assert rejection(ring, token, clock, audience="payments") is TokenRejection.wrong_audience


def test_issue_refuses_registered_claims_and_bad_lifetimes(
    ring: KeyRing, clock: ManualClock
) -> None:
    with pytest.raises(ValueError, match="exp"):
        issue(ring, clock, claims={"exp": 1})
    with pytest.raises(ValueError, match="ttl"):
        issue(ring, clock, ttl=dt.timedelta(0))
    with pytest.raises(ValueError, match="required"):
        issue(ring, clock, subject="")


def test_wrong_audience_and_issuer_are_rejected(ring: KeyRing, clock: ManualClock) -> None:
    token = issue(ring, clock)
    assert rejection(ring, token, clock, audience="payments") is TokenRejection.wrong_audience
    assert rejection(ring, token, clock, issuer="https://evil.example") is (
        TokenRejection.wrong_issuer
    )


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "exp", "iat", "jti"])
def test_missing_required_claim_is_rejected(claim: str, ring: KeyRing, clock: ManualClock) -> None:
    token = sign_raw(
        ring.active,
        {"alg": "EdDSA", "kid": ring.active.kid, "typ": "at+jwt"},
        claims_at(START, **{claim: None}),
    )
    assert rejection(ring, token, clock) is TokenRejection.missing_claim


# -- time, against the injected clock -----------------------------------------------------


def test_expiry_boundary_follows_the_injected_clock_and_leeway(
    ring: KeyRing, clock: ManualClock
) -> None:
    token = issue(ring, clock, ttl=dt.timedelta(seconds=300))
    leeway = dt.timedelta(seconds=30)
    # Far from PyJWT's own clock on purpose: the decision must follow ours.
    clock.set(START + dt.timedelta(seconds=330) - dt.timedelta(microseconds=1))
    assert verify(ring, token, clock, leeway=leeway).subject == "buyer-1"
    clock.set(START + dt.timedelta(seconds=330))
    assert rejection(ring, token, clock, leeway=leeway) is TokenRejection.expired

    # Time only moves forward: judge the no-leeway boundary with clocks of their own.
    before = ManualClock(START + dt.timedelta(seconds=300) - dt.timedelta(microseconds=1))
    assert verify(ring, token, before, leeway=dt.timedelta(0)).subject == "buyer-1"
    at_expiry = ManualClock(START + dt.timedelta(seconds=300))
    assert rejection(ring, token, at_expiry, leeway=dt.timedelta(0)) is TokenRejection.expired
    with pytest.raises(ValueError, match="leeway"):
        verify(ring, token, clock, leeway=dt.timedelta(seconds=-1))


def test_token_from_the_past_is_judged_by_the_injected_clock(
    ring: KeyRing, clock: ManualClock
) -> None:
    # Issued in 2001 and checked in 2001: PyJWT's wall clock would call it expired.
    old = ManualClock(dt.datetime(2001, 9, 9, tzinfo=dt.UTC))
    token = issue(ring, old)
    assert verify(ring, token, old).issued_at == dt.datetime(2001, 9, 9, tzinfo=dt.UTC)
    assert rejection(ring, token, clock) is TokenRejection.expired


def test_not_before_and_issued_at_in_the_future_beyond_leeway_are_rejected(
    ring: KeyRing, clock: ManualClock
) -> None:
    now = int(START.timestamp())
    header = {"alg": "EdDSA", "kid": ring.active.kid, "typ": "at+jwt"}
    leeway = dt.timedelta(seconds=30)

    at_edge = sign_raw(ring.active, header, claims_at(START, iat=now + 30, nbf=now + 30))
    assert verify(ring, at_edge, clock, leeway=leeway).subject == "buyer-1"

    early_nbf = sign_raw(ring.active, header, claims_at(START, nbf=now + 31))
    assert rejection(ring, early_nbf, clock, leeway=leeway) is TokenRejection.not_yet_valid
    future_iat = sign_raw(ring.active, header, claims_at(START, iat=now + 31, nbf=None))
    assert rejection(ring, future_iat, clock, leeway=leeway) is TokenRejection.issued_in_future

    clock.advance(1)
    assert verify(ring, early_nbf, clock, leeway=leeway).subject == "buyer-1"


@pytest.mark.parametrize("value", ["1893456300", True, None, 1e400])
def test_non_numeric_times_are_malformed(value: Any, ring: KeyRing, clock: ManualClock) -> None:
    payload = claims_at(START)
    payload["exp"] = value
    raw = json.dumps(payload).replace("Infinity", "1e400").encode()
    token = sign_raw(ring.active, {"alg": "EdDSA", "kid": ring.active.kid, "typ": "at+jwt"}, raw)
    expected = TokenRejection.missing_claim if value is None else TokenRejection.malformed
    assert rejection(ring, token, clock) is expected


# -- tampering and key selection ----------------------------------------------------------


def test_tampered_payload_header_and_signature_are_rejected(
    ring: KeyRing, clock: ManualClock
) -> None:
    token = issue(ring, clock)
    header, payload, signature = token.split(".")

    forged_claims = json.loads(b64url_decode(payload))
    forged_claims["sub"] = "admin"
    forged_payload = b64url(json.dumps(forged_claims).encode())
    assert rejection(ring, f"{header}.{forged_payload}.{signature}", clock) is (
        TokenRejection.bad_signature
    )

    forged_header = json.loads(b64url_decode(header))
    forged_header["typ"] = "AT+JWT"  # still acceptable as a type, so only the signature fails
    tampered = f"{b64url(json.dumps(forged_header).encode())}.{payload}.{signature}"
    assert rejection(ring, tampered, clock) is TokenRejection.bad_signature

    raw = bytearray(b64url_decode(signature))
    raw[0] ^= 0x01
    assert rejection(ring, f"{header}.{payload}.{b64url(bytes(raw))}", clock) is (
        TokenRejection.bad_signature
    )
    assert rejection(ring, f"{header}.{payload}.", clock) is TokenRejection.bad_signature


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + ".",
        lambda t: t.rsplit(".", 1)[0],
        lambda t: "",
        lambda t: t.replace(".", ". ", 1),
        lambda t: t[:-1] + ("B" if t[-1] == "A" else "A") + "=",
        lambda t: "e30." + t.split(".", 1)[1],
    ],
    ids=["extra-segment", "no-signature", "empty", "space", "padding", "empty-header"],
)
def test_malformed_tokens_are_rejected(mangle: Any, ring: KeyRing, clock: ManualClock) -> None:
    reason = rejection(ring, mangle(issue(ring, clock)), clock)
    assert reason in {TokenRejection.malformed, TokenRejection.unsupported_algorithm}


def test_non_canonical_base64_in_the_signature_is_rejected(
    ring: KeyRing, clock: ManualClock
) -> None:
    token = issue(ring, clock)
    head, signature = token.rsplit(".", 1)
    # An Ed25519 signature is 64 bytes: its last base64url character carries 4 unused bits.
    last = signature[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) ^ 0x01]
    assert b64url_decode(signature[:-1] + twin) == b64url_decode(signature)
    assert rejection(ring, f"{head}.{signature[:-1]}{twin}", clock) is TokenRejection.malformed


def test_payload_that_is_not_a_claims_object_is_malformed(
    ring: KeyRing, clock: ManualClock
) -> None:
    header = {"alg": "EdDSA", "kid": ring.active.kid, "typ": "at+jwt"}
    for payload in (b"[1, 2]", b"not json", b""):
        assert rejection(ring, sign_raw(ring.active, header, payload), clock) is (
            TokenRejection.malformed
        )


def test_duplicate_header_members_are_malformed(ring: KeyRing, clock: ManualClock) -> None:
    header = f'{{"alg":"EdDSA","kid":"{ring.active.kid}","typ":"at+jwt","alg":"none"}}'
    token = sign_raw(ring.active, header.encode(), claims_at(START))
    assert rejection(ring, token, clock) is TokenRejection.malformed


def test_unknown_kid_and_missing_kid_are_rejected(ring: KeyRing, clock: ManualClock) -> None:
    stranger = KeyRing.generate()
    assert rejection(ring, issue(stranger, clock), clock) is TokenRejection.unknown_key
    no_kid = sign_raw(ring.active, {"alg": "EdDSA", "typ": "at+jwt"}, claims_at(START))
    assert rejection(ring, no_kid, clock) is TokenRejection.malformed


def test_key_is_chosen_by_kid_from_the_ring_only(ring: KeyRing, clock: ManualClock) -> None:
    attacker = TokenKey.generate()
    claiming_our_kid = sign_raw(
        attacker,
        {"alg": "EdDSA", "kid": ring.active.kid, "typ": "at+jwt"},
        claims_at(START, sub="admin"),
    )
    assert rejection(ring, claiming_our_kid, clock) is TokenRejection.bad_signature


@pytest.mark.parametrize("name", ["jwk", "jku", "x5u", "x5c", "crit"])
def test_headers_that_name_keys_or_extensions_are_refused(
    name: str, ring: KeyRing, clock: ManualClock
) -> None:
    values: dict[str, Any] = {
        "jwk": ring.active.public_jwk(),
        "jku": "https://evil.example/jwks.json",
        "x5u": "https://evil.example/cert.pem",
        "x5c": ["MIIB"],
        "crit": ["exp"],
    }
    header = {"alg": "EdDSA", "kid": ring.active.kid, "typ": "at+jwt", name: values[name]}
    # Signed by our own key: refused for carrying the header, not for its signature.
    token = sign_raw(ring.active, header, claims_at(START))
    assert rejection(ring, token, clock) is TokenRejection.refused_header


def test_algorithm_must_match_the_key_not_the_header(clock: ManualClock) -> None:
    ed_ring = KeyRing.generate("EdDSA")
    es_key = TokenKey.generate("ES256")
    ed_ring.add(es_key)
    forged = sign_raw(
        ed_ring.active,
        {"alg": "EdDSA", "kid": es_key.kid, "typ": "at+jwt"},
        claims_at(START),
    )
    assert rejection(ed_ring, forged, clock) is TokenRejection.unsupported_algorithm


def test_hs256_keyed_with_our_public_key_is_rejected(ring: KeyRing, clock: ManualClock) -> None:
    # The classic confusion: HMAC keyed with the verifier's public key bytes.
    public_x = b64url_decode(ring.active.public_jwk()["x"])
    for secret in (public_x, ring.active.public_jwk()["x"].encode()):
        forged = jwt.encode(
            claims_at(START),
            secret,
            algorithm="HS256",
            headers={"kid": ring.active.kid, "typ": "at+jwt"},
        )
        assert rejection(ring, forged, clock) is TokenRejection.unsupported_algorithm


# -- rotation ----------------------------------------------------------------------------


def test_rotated_out_key_verifies_until_its_deadline_and_removed_key_does_not(
    ring: KeyRing, clock: ManualClock
) -> None:
    old_kid = ring.active.kid
    old_token = issue(ring, clock, ttl=dt.timedelta(minutes=15))

    new_key = ring.rotate(clock=clock, retain_for=dt.timedelta(minutes=20))
    assert ring.active is new_key
    assert new_key.kid != old_kid
    new_token = issue(ring, clock)
    assert jwt.get_unverified_header(new_token)["kid"] == new_key.kid
    assert verify(ring, old_token, clock).kid == old_kid
    assert verify(ring, new_token, clock).kid == new_key.kid
    assert {jwk["kid"] for jwk in ring.jwks()["keys"]} == {old_kid, new_key.kid}

    clock.advance(dt.timedelta(minutes=14))
    assert verify(ring, old_token, clock).kid == old_kid
    clock.advance(dt.timedelta(minutes=6))  # the old key's deadline
    assert rejection(ring, old_token, clock) is TokenRejection.unknown_key
    assert [jwk["kid"] for jwk in ring.jwks(clock)["keys"]] == [new_key.kid]
    assert len(ring.jwks()["keys"]) == 2  # still held until pruned
    assert ring.prune(clock) == [old_kid]
    assert [jwk["kid"] for jwk in ring.jwks()["keys"]] == [new_key.kid]

    third = ring.rotate(clock=clock, retain_for=dt.timedelta(hours=1))
    ring.remove(new_key.kid)
    assert rejection(ring, new_token, clock) is TokenRejection.unknown_key
    assert ring.active is third
    with pytest.raises(ValueError, match="rotate"):
        ring.remove(third.kid)


def test_rotation_can_change_algorithm(ring: KeyRing, clock: ManualClock) -> None:
    ed_token = issue(ring, clock)
    ring.rotate(clock=clock, retain_for=dt.timedelta(hours=1), alg="ES256")
    es_token = issue(ring, clock)
    assert jwt.get_unverified_header(es_token)["alg"] == "ES256"
    assert verify(ring, ed_token, clock).subject == verify(ring, es_token, clock).subject


def test_verification_only_ring_cannot_issue(ring: KeyRing, clock: ManualClock) -> None:
    public_only = KeyRing.from_jwks(ring.jwks())
    with pytest.raises(ValueError, match="only verifies"):
        issue(public_only, clock)
    assert verify(public_only, issue(ring, clock), clock).subject == "buyer-1"


# -- JWKS and key serialisation -----------------------------------------------------------


def test_jwks_shape_for_ed25519_and_p256(ring: KeyRing, clock: ManualClock) -> None:
    ring.rotate(clock=clock, retain_for=dt.timedelta(hours=1), alg="ES256")
    keys = ring.jwks()["keys"]
    assert list(ring.jwks()) == ["keys"]
    es, ed = keys  # signing key first
    assert set(ed) == {"kty", "crv", "x", "kid", "use", "alg"}
    assert (ed["kty"], ed["crv"], ed["use"], ed["alg"]) == ("OKP", "Ed25519", "sig", "EdDSA")
    assert len(b64url_decode(ed["x"])) == 32
    assert "d" not in ed
    assert set(es) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
    assert (es["kty"], es["crv"], es["use"], es["alg"]) == ("EC", "P-256", "sig", "ES256")
    assert len(b64url_decode(es["x"])) == len(b64url_decode(es["y"])) == 32
    for jwk in keys:
        members = {name: jwk[name] for name in ("crv", "kty", "x", "y") if name in jwk}
        canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
        assert jwk["kid"] == b64url(hashlib.sha256(canonical).digest())  # RFC 7638
    # PyJWT reads the set and the keys verify tokens.
    jwk_set = jwt.PyJWKSet.from_dict(ring.jwks())
    assert {key.key_id for key in jwk_set.keys} == {es["kid"], ed["kid"]}


def test_rfc8037_thumbprint_and_signature_vectors() -> None:
    # RFC 8037 Appendix A.3 (thumbprint of the A.2 public key) and A.4 (signature).
    key = TokenKey.from_public_jwk(
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    )
    assert key.kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    jws = (
        "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    )
    signing_input, signature = jws.rsplit(".", 1)
    assert key.verify_raw(signing_input.encode(), b64url_decode(signature))
    assert not key.verify_raw(signing_input.encode() + b"!", b64url_decode(signature))
    # Through the JWS path too, once the key is known under the token's (absent) kid.
    with pytest.raises(InvalidToken) as caught:
        KeyRing([key]).verify_jws(jws, clock=ManualClock(START))
    assert caught.value.reason is TokenRejection.malformed  # our tokens always name a kid
    # A.1's private key gives the same kid, and Ed25519 signing is deterministic.
    private = Ed25519PrivateKey.from_private_bytes(
        b64url_decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
    )
    signer = TokenKey.from_private_key(private)
    assert signer.kid == key.kid
    assert b64url(private.sign(signing_input.encode())) == signature
    # The same bytes arrive through our own path when the key is named in the header.
    restamped = sign_raw(signer, {"alg": "EdDSA", "kid": signer.kid}, b"Example of Ed25519 signing")
    verified = KeyRing([key]).verify_jws(restamped, clock=ManualClock(START))
    assert verified.payload == b"Example of Ed25519 signing"


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_private_key_pem_round_trip(alg: str) -> None:
    key = TokenKey.generate(alg)  # type: ignore[arg-type]
    pem = key.private_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert TokenKey.from_pem(pem).kid == key.kid
    locked = key.private_pem(password=b"correct horse")
    assert locked.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert TokenKey.from_pem(locked, password=b"correct horse").kid == key.kid
    with pytest.raises(ValueError):
        TokenKey.from_pem(locked, password=b"wrong")


def test_pem_refuses_keys_of_other_types() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="Ed25519 or P-256"):
        TokenKey.from_pem(rsa_pem)
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="Ed25519 or P-256"):
        TokenKey.from_private_key(p384)


def test_pem_bundle_keeps_the_signer_and_retired_deadlines(
    ring: KeyRing, clock: ManualClock
) -> None:
    old_token = issue(ring, clock)
    ring.rotate(clock=clock, retain_for=dt.timedelta(minutes=20))
    bundle = ring.pem_bundle()
    assert bundle.count("-----BEGIN PRIVATE KEY-----") == 2

    restored = KeyRing.from_pem_bundle(bundle)
    assert restored.active.kid == ring.active.kid
    assert {key.kid: key.verify_until for key in restored.known_keys()} == {
        key.kid: key.verify_until for key in ring.known_keys()
    }
    assert verify(restored, old_token, clock).subject == "buyer-1"
    clock.advance(dt.timedelta(minutes=20))
    assert rejection(restored, old_token, clock) is TokenRejection.unknown_key

    # A bundle written by hand (one key per block, no comments) works the same way.
    plain = KeyRing.from_pem_bundle(ring.active.private_pem().decode())
    assert plain.active.kid == ring.active.kid
    with pytest.raises(ValueError, match="no PEM"):
        KeyRing.from_pem_bundle("nothing here")


def test_keys_in_the_data_directory_are_created_once_with_mode_0600(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "var" / SIGNING_KEYS_FILE
    first = load_or_create_keyring(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_keyring(path)
    assert again.active.kid == first.active.kid

    path.chmod(0o644)
    load_or_create_keyring(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    token = issue(first, clock)
    first.rotate(clock=clock, retain_for=dt.timedelta(hours=1))
    save_keyring(first, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reloaded = load_or_create_keyring(path)
    assert reloaded.active.kid == first.active.kid
    assert verify(reloaded, token, clock).subject == "buyer-1"
    assert sorted(p.name for p in path.parent.iterdir()) == [SIGNING_KEYS_FILE]


def _active_kid(path: str) -> str:
    return load_or_create_keyring(Path(path)).active.kid


@pytest.mark.slow
def test_processes_starting_together_share_one_signing_key(tmp_path: Path) -> None:
    """API processes released at the same moment on a new data directory all end up
    with the first writer's ring; none reads a half-written file ("no PEM private key")."""
    for attempt in range(5):
        path = tmp_path / f"round-{attempt}" / SIGNING_KEYS_FILE
        kids = answers_of_processes_released_together(_active_kid, str(path))
        assert kids == {KeyRing.from_pem_bundle(path.read_text(encoding="ascii")).active.kid}
        assert sorted(p.name for p in path.parent.iterdir()) == [SIGNING_KEYS_FILE]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use": "enc"}, "use"),
        ({"key_ops": ["encrypt"]}, "key_ops"),
        ({"alg": "ES256"}, "declares alg"),
        ({"d": "AAAA"}, "private"),
        ({"crv": "Ed448"}, "unsupported"),
        ({"x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHUR"}, None),  # 31 bytes
    ],
)
def test_public_jwk_import_refuses_keys_not_for_our_signatures(
    change: dict[str, Any], message: str | None
) -> None:
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    jwk.update(change)
    with pytest.raises(ValueError, match=message):
        TokenKey.from_public_jwk(jwk)
    assert KeyRing.from_jwks({"keys": [jwk]}).known_keys() == ()


def test_invalid_token_is_a_401_problem_with_bearer_challenge(
    ring: KeyRing, clock: ManualClock
) -> None:
    token = issue(ring, clock)
    clock.advance(dt.timedelta(hours=1))
    with pytest.raises(InvalidToken) as caught:
        verify(ring, token, clock)
    problem = caught.value
    assert problem.status == 401
    assert problem.slug == "unauthorized"
    assert problem.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    assert problem.detail == "The access token has expired."
    with pytest.raises(InvalidToken) as caught:
        verify(ring, issue(KeyRing.generate(), clock), clock)
    assert caught.value.detail == "The access token is not valid."
    assert "unknown" not in caught.value.detail


# -- RFC 7515 Appendix A ------------------------------------------------------------------

# RFC 7515 A.1 (HS256) key and token, and A.5 (unsecured, alg "none").
RFC7515_A1_KEY = (
    "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"
)
RFC7515_A1_TOKEN = (
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9."
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ."
    "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)
RFC7515_A5_TOKEN = (
    "eyJhbGciOiJub25lIn0."
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ."
)


def test_rfc7515_a5_unsecured_token_is_rejected(ring: KeyRing, clock: ManualClock) -> None:
    for check in (
        lambda: ring.verify(RFC7515_A5_TOKEN, audience="joe", issuer="joe", clock=clock),
        lambda: ring.verify_jws(RFC7515_A5_TOKEN, clock=clock),
    ):
        with pytest.raises(InvalidToken) as caught:
            check()
        assert caught.value.reason is TokenRejection.unsupported_algorithm
    # Naming one of our keys does not help it.
    header = b64url(json.dumps({"alg": "none", "kid": ring.active.kid}).encode())
    _, payload, _ = RFC7515_A5_TOKEN.split(".")
    assert rejection(ring, f"{header}.{payload}.", clock) is TokenRejection.unsupported_algorithm


def test_rfc7515_a1_hs256_token_is_rejected_because_hs256_is_not_allowed(
    ring: KeyRing,
) -> None:
    moment = ManualClock(dt.datetime.fromtimestamp(1300819380 - 60, dt.UTC))  # before its exp
    with pytest.raises(InvalidToken) as caught:
        ring.verify(RFC7515_A1_TOKEN, audience="joe", issuer="joe", clock=moment)
    assert caught.value.reason is TokenRejection.unsupported_algorithm


def test_rfc7515_a1_vector_is_read_right_by_pyjwt() -> None:
    key = b64url_decode(RFC7515_A1_KEY)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(RFC7515_A1_TOKEN, key, algorithms=["HS256"])
    claims = jwt.decode(RFC7515_A1_TOKEN, key, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"iss": "joe", "exp": 1300819380, "http://example.com/is_root": True}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(RFC7515_A1_TOKEN, key[:-1] + b"\x00", algorithms=["HS256"])


# -- Wycheproof JSON Web Signature ----------------------------------------------------------

WYCHEPROOF_JWS = json.loads((DATA / "json_web_signature_test.json").read_text())
ALLOWED = {"EdDSA", "ES256"}


def _unverified_header(jws: Any) -> dict[str, Any] | None:
    if not isinstance(jws, str):
        return None
    try:
        header = json.loads(b64url_decode(jws.split(".", 1)[0]))
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def _wycheproof_cases() -> list[Any]:
    cases = []
    for group in WYCHEPROOF_JWS["testGroups"]:
        for case in group["tests"]:
            cases.append(pytest.param(group, case, id=f"tc{case['tcId']}"))
    return cases


def _trusted_ring(group: dict[str, Any], header: dict[str, Any] | None) -> KeyRing:
    """The case's public key as the one trusted key when we support its type; otherwise a
    key of ours under the case's kid, so a rejection cannot come from an unknown kid."""
    public = group.get("public")
    if public is not None and public.get("kty") in {"EC", "OKP"}:
        return KeyRing.from_jwks({"keys": [public]})
    stand_in = TokenKey.generate()
    kid = (header or {}).get("kid")
    if isinstance(kid, str) and kid:
        stand_in = dataclasses.replace(stand_in, kid=kid)
    return KeyRing([stand_in])


def test_wycheproof_jws_file_is_complete() -> None:
    cases = [case for group in WYCHEPROOF_JWS["testGroups"] for case in group["tests"]]
    assert len(cases) == WYCHEPROOF_JWS["numberOfTests"] == 401
    ours = [
        case for case in cases if ((_unverified_header(case["jws"]) or {}).get("alg")) in ALLOWED
    ]
    # The ES256 cases are the ones whose verdict we must reproduce; the file has no EdDSA.
    assert len(ours) == 35  # tcId 18-25, 32, 354, 356, 378-401
    assert sum(case["result"] == "valid" for case in ours) == 2


@pytest.mark.parametrize(("group", "case"), _wycheproof_cases())
def test_wycheproof_jws_case(group: dict[str, Any], case: dict[str, Any]) -> None:
    clock = ManualClock(START)
    jws = case["jws"] if isinstance(case["jws"], str) else json.dumps(case["jws"])
    header = _unverified_header(case["jws"])
    ring = _trusted_ring(group, header)
    alg = (header or {}).get("alg")

    if alg in ALLOWED:
        if case["result"] == "valid":
            verified = ring.verify_jws(jws, clock=clock)
            assert verified.key.kid == header["kid"]  # type: ignore[index]
        else:
            with pytest.raises(InvalidToken):
                ring.verify_jws(jws, clock=clock)
    else:
        with pytest.raises(InvalidToken) as caught:
            ring.verify_jws(jws, clock=clock)
        # Refused for what the token is, not because its key happened to be missing.
        assert caught.value.reason in {
            TokenRejection.unsupported_algorithm,
            TokenRejection.malformed,
            TokenRejection.refused_header,
        }
    # None of these payloads is an access token of ours: full verification refuses all.
    with pytest.raises(InvalidToken):
        ring.verify(jws, audience=AUDIENCE, issuer=ISSUER, clock=clock)


def _wycheproof_case(tc_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    for group in WYCHEPROOF_JWS["testGroups"]:
        for case in group["tests"]:
            if case["tcId"] == tc_id:
                return group, case
    raise LookupError(tc_id)


def test_wycheproof_16_alg_none_is_rejected() -> None:
    group, case = _wycheproof_case(16)
    assert _unverified_header(case["jws"]) == {"alg": "none", "kid": "kid-aes-sign"}
    ring = _trusted_ring(group, _unverified_header(case["jws"]))
    with pytest.raises(InvalidToken) as caught:
        ring.verify_jws(case["jws"], clock=ManualClock(START))
    assert caught.value.reason is TokenRejection.unsupported_algorithm


def test_wycheproof_31_hs256_keyed_with_the_ec_public_key_is_rejected() -> None:
    group, case = _wycheproof_case(31)
    assert _unverified_header(case["jws"]) == {"alg": "HS256", "kid": "kid-ec-sign"}
    ring = KeyRing.from_jwks({"keys": [group["public"]]})
    assert [key.kid for key in ring.known_keys()] == ["kid-ec-sign"]
    with pytest.raises(InvalidToken) as caught:
        ring.verify_jws(case["jws"], clock=ManualClock(START))
    assert caught.value.reason is TokenRejection.unsupported_algorithm


def test_wycheproof_32_embedded_jwk_is_not_trusted() -> None:
    group, case = _wycheproof_case(32)
    header = _unverified_header(case["jws"])
    assert header is not None
    assert header["jwk"]["x"] != group["public"]["x"]  # the attacker's own key
    ring = KeyRing.from_jwks({"keys": [group["public"]]})
    with pytest.raises(InvalidToken) as caught:
        ring.verify_jws(case["jws"], clock=ManualClock(START))
    assert caught.value.reason is TokenRejection.refused_header
    # The signature is the attacker's: PyJWT with the real key would refuse it as well.
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.PyJWS().decode_complete(
            case["jws"],
            ring.get("kid-ec-sign").public_key,
            algorithms=["ES256"],  # type: ignore[union-attr]
        )


# -- Wycheproof Ed25519: the raw signature primitive the EdDSA token path uses --------------

WYCHEPROOF_ED25519 = json.loads((DATA / "ed25519_test.json").read_text())


def _ed25519_cases() -> list[Any]:
    return [
        pytest.param(group["publicKeyJwk"], case, id=f"tc{case['tcId']}")
        for group in WYCHEPROOF_ED25519["testGroups"]
        for case in group["tests"]
    ]


def test_wycheproof_ed25519_file_is_complete() -> None:
    assert len(_ed25519_cases()) == WYCHEPROOF_ED25519["numberOfTests"] == 151


@pytest.mark.parametrize(("jwk", "case"), _ed25519_cases())
def test_wycheproof_ed25519_case(jwk: dict[str, Any], case: dict[str, Any]) -> None:
    key = TokenKey.from_public_jwk(jwk)
    verdict = key.verify_raw(bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"]))
    assert verdict is (case["result"] == "valid")


# -- verified tokens remembered ------------------------------------------------------------


def _decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each full decode (signature check) PyJWT makes from now on."""
    seen: list[str] = []
    original = jwt.PyJWT.decode_complete

    def counting(self: jwt.PyJWT, token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return original(self, token, *args, **kwargs)

    monkeypatch.setattr(jwt.PyJWT, "decode_complete", counting)
    return seen


def test_a_token_that_verified_is_not_checked_again_but_its_times_are(
    ring: KeyRing, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = issue(ring, clock, ttl=dt.timedelta(minutes=5))
    decodes = _decodes(monkeypatch)
    first = verify(ring, token, clock)
    again = verify(ring, token, clock)
    assert decodes == [token]
    assert again == first and again.claims == first.claims
    with pytest.raises(TypeError):
        again.claims["sub"] = "someone-else"  # type: ignore[index]
    clock.advance(dt.timedelta(minutes=5, seconds=29))
    assert verify(ring, token, clock).subject == "buyer-1"
    clock.advance(dt.timedelta(seconds=1))  # exp + the 30 s leeway
    assert rejection(ring, token, clock) is TokenRejection.expired
    assert decodes == [token]


def test_a_remembered_token_is_judged_anew_for_other_checks_and_other_bytes(
    ring: KeyRing, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = issue(ring, clock)
    verify(ring, token, clock)
    decodes = _decodes(monkeypatch)
    assert rejection(ring, token, clock, audience="another-api") is TokenRejection.wrong_audience
    assert rejection(ring, token, clock, issuer="https://other.example") is (
        TokenRejection.wrong_issuer
    )
    assert rejection(ring, token, clock, token_type="JWT") is TokenRejection.wrong_type
    head, body, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert rejection(ring, f"{head}.{body}.{flipped}", clock) is TokenRejection.bad_signature
    assert len(decodes) == 3  # the typ check refuses before any decode
    assert verify(ring, token, clock).subject == "buyer-1"
    assert len(decodes) == 3


def test_a_remembered_token_follows_its_key_out_of_the_ring(
    ring: KeyRing, clock: ManualClock
) -> None:
    old_token = issue(ring, clock, ttl=dt.timedelta(minutes=15))
    verify(ring, old_token, clock)
    new_key = ring.rotate(clock=clock, retain_for=dt.timedelta(minutes=20))
    # Retired by the rotation, the old key still verifies until its deadline ...
    assert verify(ring, old_token, clock).kid != new_key.kid
    clock.advance(dt.timedelta(minutes=20))
    # ... and not after it, remembered or not.
    assert rejection(ring, old_token, clock) is TokenRejection.unknown_key

    new_token = issue(ring, clock)
    verify(ring, new_token, clock)
    ring.rotate(clock=clock, retain_for=dt.timedelta(hours=1))
    ring.remove(new_key.kid)
    assert rejection(ring, new_token, clock) is TokenRejection.unknown_key


def test_tokens_that_fail_are_not_remembered_and_the_memory_is_bounded(
    ring: KeyRing, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_module, "VERIFIED_TOKENS_REMEMBERED", 8)
    stranger = KeyRing.generate()
    for number in range(20):
        assert rejection(ring, issue(stranger, clock, jti=f"x-{number}"), clock) is (
            TokenRejection.unknown_key
        )
    tokens = [issue(ring, clock, jti=f"t-{number}") for number in range(20)]
    for token in tokens:
        verify(ring, token, clock)
    remembered = {memo[0] for memo in ring._verified}
    assert remembered == set(tokens[-8:])  # the newest, forged ones never
    decodes = _decodes(monkeypatch)
    verify(ring, tokens[0], clock)  # forgotten: checked in full again
    assert decodes == [tokens[0]]
