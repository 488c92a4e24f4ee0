"""One-time codes: HOTP (RFC 4226), TOTP (RFC 6238), authenticator provisioning, SMS codes.

Secrets are raw bytes here; :func:`new_totp_secret` and :func:`decode_secret` convert to
and from the base32 text authenticator apps use. :func:`verify_totp` returns the time
step it matched so the caller can store it and refuse that step and every earlier one
next time (RFC 6238 section 5.2: a code is accepted once).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Final
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from soko.platform.clock import ensure_utc


class OtpAlgorithm(StrEnum):
    SHA1 = "SHA1"
    SHA256 = "SHA256"
    SHA512 = "SHA512"


_DIGESTS: Final[dict[OtpAlgorithm, str]] = {
    OtpAlgorithm.SHA1: "sha1",
    OtpAlgorithm.SHA256: "sha256",
    OtpAlgorithm.SHA512: "sha512",
}

DEFAULT_PERIOD: Final = 30
DEFAULT_DIGITS: Final = 6
SECRET_BYTES: Final = 20  # 160 bits, RFC 4226 section 4 R6's recommendation
MIN_SECRET_BYTES: Final = 16  # RFC 4226 section 4 R6: at least 128 bits


def _check_digits(digits: int) -> None:
    # RFC 4226 section 5.3: at least 6; beyond 8 the 31-bit truncation stops being uniform.
    if not 6 <= digits <= 8:
        raise ValueError("one-time codes have 6 to 8 digits")


def hotp(
    secret: bytes,
    counter: int,
    *,
    digits: int = DEFAULT_DIGITS,
    algorithm: OtpAlgorithm = OtpAlgorithm.SHA1,
) -> str:
    """The RFC 4226 code for ``counter``, as a string that keeps its leading zeros."""
    _check_digits(digits)
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError("an OTP secret needs at least 128 bits")
    if not 0 <= counter < 1 << 64:
        raise ValueError("the counter is an unsigned 64-bit number")
    mac = hmac.new(secret, counter.to_bytes(8, "big"), _DIGESTS[OtpAlgorithm(algorithm)])
    digest = mac.digest()
    offset = digest[-1] & 0x0F  # dynamic truncation, RFC 4226 section 5.3
    number = int.from_bytes(digest[offset : offset + 4], "big") & 0x7FFFFFFF
    return f"{number % 10**digits:0{digits}d}"


def time_step(at: dt.datetime | int, *, period: int = DEFAULT_PERIOD) -> int:
    """RFC 6238's T: whole periods since the Unix epoch (T0 = 0)."""
    if period <= 0:
        raise ValueError("period must be positive")
    seconds = at if isinstance(at, int) else int(ensure_utc(at).timestamp() // 1)
    return seconds // period


def totp(
    secret: bytes,
    at: dt.datetime | int,
    *,
    digits: int = DEFAULT_DIGITS,
    algorithm: OtpAlgorithm = OtpAlgorithm.SHA1,
    period: int = DEFAULT_PERIOD,
) -> str:
    """The RFC 6238 code at ``at`` (an aware datetime or Unix seconds)."""
    return hotp(secret, time_step(at, period=period), digits=digits, algorithm=algorithm)


def codes_equal(expected: str, given: str) -> bool:
    """Compare two codes in time independent of where they differ."""
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))


def verify_totp(
    secret: bytes,
    code: str,
    at: dt.datetime | int,
    window: int = 1,
    last_used_step: int | None = None,
    *,
    digits: int = DEFAULT_DIGITS,
    algorithm: OtpAlgorithm = OtpAlgorithm.SHA1,
    period: int = DEFAULT_PERIOD,
) -> int | None:
    """Check ``code`` against the steps within ``window`` of ``at``; return the matched
    step, or None.

    Steps at or before ``last_used_step`` are never accepted, so storing the returned
    step and passing it back refuses a replayed code and any older one. Should two steps
    in the window share a code, the later one is returned, which refuses more.
    """
    if window < 0:
        raise ValueError("window cannot be negative")
    code = code.strip()
    if len(code) != digits or not code.isascii() or not code.isdigit():
        return None
    current = time_step(at, period=period)
    matched = None
    # Every candidate is computed and compared, so timing does not say which step matched.
    for step in range(max(current - window, 0), current + window + 1):
        expected = hotp(secret, step, digits=digits, algorithm=algorithm)
        fresh = last_used_step is None or step > last_used_step
        if codes_equal(expected, code) and fresh:
            matched = step
    return matched


# -- secrets and provisioning ------------------------------------------------------------


def new_totp_secret() -> str:
    """A fresh 160-bit secret as unpadded base32, the form authenticator apps read."""
    return encode_secret(secrets.token_bytes(SECRET_BYTES))


def encode_secret(secret: bytes) -> str:
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def decode_secret(text: str) -> bytes:
    """Read base32 as people type it: any case, spaces or hyphens, padding optional."""
    cleaned = "".join(text.split()).replace("-", "").upper().rstrip("=")
    try:
        return base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except binascii.Error as exc:
        raise ValueError("not a base32 secret") from exc


@dataclass(frozen=True)
class TotpProvisioning:
    """What an ``otpauth://totp/`` URI carries (the Key URI format of authenticator apps)."""

    secret: str
    account: str
    issuer: str
    algorithm: OtpAlgorithm = OtpAlgorithm.SHA1
    digits: int = DEFAULT_DIGITS
    period: int = DEFAULT_PERIOD

    def uri(self) -> str:
        for name, value in (("issuer", self.issuer), ("account", self.account)):
            # The label splits on the first colon, and apps disagree about an escaped one.
            if not value or ":" in value:
                raise ValueError(f"the {name} must be non-empty and contain no colon")
        _check_digits(self.digits)
        decode_secret(self.secret)
        label = f"{quote(self.issuer, safe='')}:{quote(self.account, safe='')}"
        query = urlencode(
            {
                "secret": self.secret.upper().rstrip("="),
                "issuer": self.issuer,
                "algorithm": OtpAlgorithm(self.algorithm).value,
                "digits": str(self.digits),
                "period": str(self.period),
            },
            quote_via=quote,  # %20 rather than "+": apps read the query as plain percent-encoding
        )
        return f"otpauth://totp/{label}?{query}"

    @classmethod
    def parse(cls, uri: str) -> TotpProvisioning:
        parts = urlsplit(uri)
        if parts.scheme != "otpauth" or parts.netloc != "totp":
            raise ValueError("not an otpauth://totp/ URI")
        label = unquote(parts.path.removeprefix("/"))
        label_issuer, colon, account = label.partition(":")
        if not colon:
            label_issuer, account = "", label_issuer
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        issuer = query.get("issuer", label_issuer)
        if label_issuer and issuer != label_issuer:
            raise ValueError("the label's issuer and the issuer parameter differ")
        secret = query.get("secret", "")
        decode_secret(secret)
        return cls(
            secret=secret,
            account=account,
            issuer=issuer,
            algorithm=OtpAlgorithm(query.get("algorithm", "SHA1").upper()),
            digits=int(query.get("digits", DEFAULT_DIGITS)),
            period=int(query.get("period", DEFAULT_PERIOD)),
        )


def provisioning_uri(
    secret: str,
    *,
    account: str,
    issuer: str,
    algorithm: OtpAlgorithm = OtpAlgorithm.SHA1,
    digits: int = DEFAULT_DIGITS,
    period: int = DEFAULT_PERIOD,
) -> str:
    """``otpauth://totp/Issuer:account?secret=...&issuer=...&algorithm=...&digits=...&period=...``"""
    return TotpProvisioning(secret, account, issuer, algorithm, digits, period).uri()


# -- codes sent by SMS or email -----------------------------------------------------------


def numeric_code(digits: int = DEFAULT_DIGITS) -> str:
    """A uniformly random code of exactly ``digits`` digits, leading zeros kept."""
    if not 4 <= digits <= 12:
        raise ValueError("a numeric code has 4 to 12 digits")
    return f"{secrets.randbelow(10**digits):0{digits}d}"
