"""HOTP and TOTP against RFC 4226 and RFC 6238, plus verification rules, provisioning URIs
and SMS codes. Pure functions: no database, so no backend parametrisation."""

from __future__ import annotations

import base64
import datetime as dt
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from soko.platform import otp
from soko.platform.otp import (
    OtpAlgorithm,
    TotpProvisioning,
    decode_secret,
    hotp,
    new_totp_secret,
    numeric_code,
    provisioning_uri,
    time_step,
    totp,
    verify_totp,
)

# RFC 4226 Appendix D: secret ASCII "12345678901234567890", HMAC-SHA-1, 6 digits.
RFC4226_SECRET = b"12345678901234567890"
RFC4226_CODES = [
    "755224",
    "287082",
    "359152",
    "969429",
    "338314",
    "254676",
    "287922",
    "162583",
    "399871",
    "520489",
]

# RFC 6238 Appendix B: T0 = 0, 30 s steps, 8 digits. Each hash has its own seed length:
# the 20-byte ASCII string for SHA-1, repeated to 32 bytes for SHA-256, 64 for SHA-512.
RFC6238_SEEDS = {
    OtpAlgorithm.SHA1: b"12345678901234567890",
    OtpAlgorithm.SHA256: b"12345678901234567890123456789012",
    OtpAlgorithm.SHA512: b"1234567890123456789012345678901234567890123456789012345678901234",
}
RFC6238_TABLE = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]
RFC6238_CASES = [
    pytest.param(unix, algorithm, code, id=f"{algorithm.value}-{unix}")
    for unix, *codes in RFC6238_TABLE
    for algorithm, code in zip(OtpAlgorithm, codes, strict=True)
]

SECRET = RFC4226_SECRET
AT = dt.datetime(2030, 1, 1, 0, 0, 10, tzinfo=dt.UTC)


@pytest.mark.parametrize(("counter", "expected"), list(enumerate(RFC4226_CODES)))
def test_rfc4226_appendix_d(counter: int, expected: str) -> None:
    assert hotp(RFC4226_SECRET, counter) == expected


@pytest.mark.parametrize(("unix", "algorithm", "expected"), RFC6238_CASES)
def test_rfc6238_appendix_b(unix: int, algorithm: OtpAlgorithm, expected: str) -> None:
    seed = RFC6238_SEEDS[algorithm]
    assert totp(seed, unix, digits=8, algorithm=algorithm) == expected
    moment = dt.datetime.fromtimestamp(unix, dt.UTC)
    assert totp(seed, moment, digits=8, algorithm=algorithm) == expected


@pytest.mark.parametrize(("unix", "algorithm", "expected"), RFC6238_CASES)
def test_six_digit_code_is_the_eight_digit_value_mod_a_million(
    unix: int, algorithm: OtpAlgorithm, expected: str
) -> None:
    code = totp(RFC6238_SEEDS[algorithm], unix, digits=6, algorithm=algorithm)
    assert code == expected[-6:]
    assert int(code) == int(expected) % 10**6


def test_seed_length_trap_is_understood() -> None:
    # The 20-byte SHA-1 seed used with SHA-256 gives a different, wrong value at T=59.
    short = RFC6238_SEEDS[OtpAlgorithm.SHA1]
    assert totp(short, 59, digits=8, algorithm=OtpAlgorithm.SHA256) == "32247374"
    assert totp(short, 59, digits=8, algorithm=OtpAlgorithm.SHA256) != "46119246"
    assert totp(short, 59, digits=8, algorithm=OtpAlgorithm.SHA512) != "90693936"


def test_time_step_uses_t0_zero_and_thirty_seconds() -> None:
    assert time_step(59) == 1
    assert time_step(60) == 2
    assert time_step(dt.datetime(1970, 1, 1, 0, 0, 29, 999999, tzinfo=dt.UTC)) == 0
    assert time_step(1111111109) == 0x23523EC  # RFC 6238 Appendix B's T column
    assert time_step(20000000000) == 0x27BC86AA
    east = dt.datetime(1970, 1, 1, 3, 1, tzinfo=dt.timezone(dt.timedelta(hours=3)))
    assert time_step(east) == 2
    with pytest.raises(ValueError, match="naive"):
        time_step(dt.datetime(2030, 1, 1))


def test_hotp_refuses_weak_or_unsupported_parameters() -> None:
    with pytest.raises(ValueError, match="128 bits"):
        hotp(b"short secret", 0)
    with pytest.raises(ValueError, match="6 to 8"):
        hotp(SECRET, 0, digits=5)
    with pytest.raises(ValueError, match="6 to 8"):
        hotp(SECRET, 0, digits=9)
    with pytest.raises(ValueError, match="64-bit"):
        hotp(SECRET, -1)
    with pytest.raises(ValueError):
        hotp(SECRET, 0, algorithm="MD5")  # type: ignore[arg-type]


# -- verification -------------------------------------------------------------------------


def code_at_step(step: int, **kwargs: Any) -> str:
    return hotp(SECRET, step, **kwargs)


def test_window_accepts_neighbouring_steps_and_refuses_further_ones() -> None:
    current = time_step(AT)
    for offset in (-1, 0, 1):
        assert verify_totp(SECRET, code_at_step(current + offset), AT) == current + offset
    for offset in (-2, 2):
        assert verify_totp(SECRET, code_at_step(current + offset), AT) is None
    assert verify_totp(SECRET, code_at_step(current - 1), AT, window=0) is None
    assert verify_totp(SECRET, code_at_step(current), AT, window=0) == current
    assert verify_totp(SECRET, code_at_step(current - 2), AT, window=2) == current - 2
    with pytest.raises(ValueError, match="negative"):
        verify_totp(SECRET, code_at_step(current), AT, window=-1)


def test_used_step_and_earlier_steps_are_refused() -> None:
    current = time_step(AT)
    code = totp(SECRET, AT)
    used = verify_totp(SECRET, code, AT)
    assert used == current
    # The same code again, even a second later in the same step: refused.
    assert verify_totp(SECRET, code, AT + dt.timedelta(seconds=1), last_used_step=used) is None
    # An older code still inside the window: refused too.
    older = code_at_step(current - 1)
    assert verify_totp(SECRET, older, AT, last_used_step=used) is None
    # The next step's code is fresh.
    later = AT + dt.timedelta(seconds=30)
    assert verify_totp(SECRET, totp(SECRET, later), later, last_used_step=used) == current + 1


def test_codes_of_the_wrong_shape_are_refused() -> None:
    code = totp(SECRET, AT)
    assert verify_totp(SECRET, f" {code} ", AT) == time_step(AT)  # pasted with spaces
    for wrong in (
        "",
        code[:-1],
        code + "0",
        "abcdef",
        "\uff11\uff12\uff13\uff14\uff15\uff16",
        "12 345",
        "-12345",
    ):
        assert verify_totp(SECRET, wrong, AT) is None


def test_leading_zeros_are_significant() -> None:
    seed = RFC6238_SEEDS[OtpAlgorithm.SHA1]
    moment = dt.datetime.fromtimestamp(1111111109, dt.UTC)
    step = time_step(moment)
    assert verify_totp(seed, "07081804", moment, window=0, digits=8) == step
    assert verify_totp(seed, "7081804", moment, window=0, digits=8) is None
    assert verify_totp(seed, "081804", moment, window=0) == step


@pytest.mark.parametrize("algorithm", list(OtpAlgorithm))
def test_verify_with_each_algorithm_and_eight_digits(algorithm: OtpAlgorithm) -> None:
    seed = RFC6238_SEEDS[algorithm]
    code = totp(seed, AT, digits=8, algorithm=algorithm)
    assert verify_totp(seed, code, AT, digits=8, algorithm=algorithm) == time_step(AT)
    other = next(a for a in OtpAlgorithm if a is not algorithm)
    assert verify_totp(seed, code, AT, window=0, digits=8, algorithm=other) is None


def test_every_candidate_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = otp.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(otp.hmac, "compare_digest", spy)
    current = time_step(AT)
    assert verify_totp(SECRET, code_at_step(current - 1), AT) == current - 1
    # All three steps of the window were compared, though the first one matched.
    assert len(calls) == 3
    assert {given for _, given in calls} == {code_at_step(current - 1).encode()}


# -- secrets and provisioning -------------------------------------------------------------


def test_new_secret_is_160_bits_of_unpadded_base32() -> None:
    secrets_made = {new_totp_secret() for _ in range(50)}
    assert len(secrets_made) == 50
    for secret in secrets_made:
        assert re.fullmatch(r"[A-Z2-7]{32}", secret)
        assert len(decode_secret(secret)) == 20


def test_decode_secret_reads_what_people_type() -> None:
    secret = base64.b32encode(RFC4226_SECRET).decode()
    assert secret == "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
    assert decode_secret(secret) == RFC4226_SECRET
    spaced = " ".join(secret[i : i + 4] for i in range(0, len(secret), 4)).lower()
    assert decode_secret(spaced) == RFC4226_SECRET
    assert decode_secret("GEZDGNBVGY3TQOJQ-GEZDGNBVGY3TQOJQ") == RFC4226_SECRET
    assert decode_secret("MZXW6===") == decode_secret("mzxw6") == b"foo"
    with pytest.raises(ValueError, match="base32"):
        decode_secret("not base32 at all!")


def test_provisioning_uri_format_and_escaping() -> None:
    secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
    uri = provisioning_uri(secret, account="amina+shop@example.com", issuer="Soko Market & Co")
    assert uri == (
        "otpauth://totp/Soko%20Market%20%26%20Co:amina%2Bshop%40example.com"
        "?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Soko%20Market%20%26%20Co"
        "&algorithm=SHA1&digits=6&period=30"
    )
    # Read back by the standard library alone, independently of our parser.
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    assert query["issuer"] == ["Soko Market & Co"]
    assert query["secret"] == [secret]
    assert (query["algorithm"], query["digits"], query["period"]) == (["SHA1"], ["6"], ["30"])


@pytest.mark.parametrize(
    "provisioning",
    [
        TotpProvisioning(new_totp_secret(), "amina@example.com", "Soko"),
        TotpProvisioning(new_totp_secret(), "Jo Ko/é?#&=%", "Soko Market, Ltd/Nairobi"),
        TotpProvisioning(new_totp_secret(), "+254700000000", "Soko", OtpAlgorithm.SHA512, 8, 60),
    ],
    ids=["plain", "awkward-characters", "sha512-8-digits"],
)
def test_provisioning_uri_round_trip(provisioning: TotpProvisioning) -> None:
    parsed = TotpProvisioning.parse(provisioning.uri())
    assert parsed == provisioning
    secret = decode_secret(parsed.secret)
    assert totp(
        secret, AT, digits=parsed.digits, algorithm=parsed.algorithm, period=parsed.period
    ) == totp(
        decode_secret(provisioning.secret),
        AT,
        digits=provisioning.digits,
        algorithm=provisioning.algorithm,
        period=provisioning.period,
    )


def test_provisioning_refuses_colons_and_bad_input() -> None:
    secret = new_totp_secret()
    with pytest.raises(ValueError, match="issuer"):
        provisioning_uri(secret, account="amina", issuer="Soko:Admin")
    with pytest.raises(ValueError, match="account"):
        provisioning_uri(secret, account="a:b", issuer="Soko")
    with pytest.raises(ValueError, match="base32"):
        provisioning_uri("!!", account="amina", issuer="Soko")
    with pytest.raises(ValueError, match="otpauth"):
        TotpProvisioning.parse("https://totp/Soko:amina?secret=" + secret)
    with pytest.raises(ValueError, match="differ"):
        TotpProvisioning.parse(f"otpauth://totp/Soko:amina?secret={secret}&issuer=Other")


# -- SMS codes ------------------------------------------------------------------------------


def test_numeric_code_draws_uniformly_and_keeps_leading_zeros(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[int] = []

    def fixed(bound: int) -> int:
        asked.append(bound)
        return 42

    monkeypatch.setattr(otp.secrets, "randbelow", fixed)
    assert numeric_code() == "000042"
    assert numeric_code(8) == "00000042"
    # One draw over the whole range: no modulo bias, no digit-by-digit assembly.
    assert asked == [10**6, 10**8]


def test_numeric_codes_have_every_leading_digit() -> None:
    codes = [numeric_code() for _ in range(5000)]
    assert all(re.fullmatch(r"\d{6}", code) for code in codes)
    # A missing leading zero would show as "0" never appearing first (chance ~ 0.9**5000).
    assert {code[0] for code in codes} == set("0123456789")
    with pytest.raises(ValueError):
        numeric_code(3)
