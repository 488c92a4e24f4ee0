"""Signed access tokens: a keyring of asymmetric keys, compact JWS issue and verify, JWKS.

Tokens are JWTs signed with EdDSA (Ed25519) or, where a client needs it, ES256. Each key
is named by its RFC 7638 JWK thumbprint (``kid``). One key signs; keys rotated out stay
in the ring for verification until their ``verify_until`` passes, so tokens issued just
before a rotation keep working until they expire.

Verification trusts nothing the token says about keys: the key is chosen by ``kid``
from this ring only, the algorithm must be the one that key is bound to, and a token
carrying ``jwk``, ``jku``, ``x5u``, ``x5c`` or ``crit`` is refused outright. Every failure
raises :class:`InvalidToken` with a :class:`TokenRejection` reason. Time claims are
checked against the injected clock, not PyJWT's own (PyJWT's time checks are disabled).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
import re
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm

from soko.platform.clock import Clock, ensure_utc
from soko.platform.errors import Unauthorized
from soko.platform.files import publish_once, replace_private

TokenAlgorithm = Literal["EdDSA", "ES256"]
ALLOWED_ALGORITHMS: Final[frozenset[str]] = frozenset({"EdDSA", "ES256"})

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey

ACCESS_TOKEN_TYPE: Final = "at+jwt"
REGISTERED_CLAIMS: Final = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})
DEFAULT_REQUIRED_CLAIMS: Final = ("iss", "sub", "aud", "exp", "iat", "jti")
DEFAULT_LEEWAY: Final = dt.timedelta(seconds=30)
# The latest time claim a token may carry: 9999-12-31T00:00:00Z, a day before the last
# moment a datetime holds, so the claim plus any leeway still reads as a datetime.
NUMERIC_DATE_MAX: Final = 253_402_214_400
# How many verified tokens a ring remembers (see KeyRing.verify): about 2 KiB each.
VERIFIED_TOKENS_REMEMBERED: Final = 4096

# Header parameters that would let the token name its own verification key (RFC 8725
# section 3.1 and the embedded-jwk attack) or demand extensions we do not implement.
_REFUSED_HEADERS: Final = frozenset({"jwk", "jku", "x5u", "x5c", "crit", "b64"})
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_PEM_BLOCK: Final = re.compile(
    r"-----BEGIN (?P<label>[A-Z0-9 ]+)-----\r?\n.*?-----END (?P=label)-----\r?\n?", re.DOTALL
)
_VERIFY_UNTIL_LINE: Final = re.compile(r"^\s*#?\s*verify-until:\s*(\S+)\s*$", re.MULTILINE)

_ALGORITHM_IMPLEMENTATIONS: Final[dict[str, Algorithm]] = {
    "EdDSA": OKPAlgorithm(),
    "ES256": ECAlgorithm(ECAlgorithm.SHA256),
}


class TokenRejection(StrEnum):
    """Why a token was refused; logged and counted, never needed by the client."""

    malformed = "malformed"
    unsupported_algorithm = "unsupported_algorithm"
    refused_header = "refused_header"
    unknown_key = "unknown_key"
    bad_signature = "bad_signature"
    wrong_type = "wrong_type"
    expired = "expired"
    not_yet_valid = "not_yet_valid"
    issued_in_future = "issued_in_future"
    wrong_audience = "wrong_audience"
    wrong_issuer = "wrong_issuer"
    missing_claim = "missing_claim"


_DETAILS: Final[dict[TokenRejection, str]] = {
    TokenRejection.expired: "The access token has expired.",
    TokenRejection.not_yet_valid: "The access token is not valid yet.",
    TokenRejection.issued_in_future: "The access token is not valid yet.",
}


class InvalidToken(Unauthorized):
    """A token failed verification. ``reason`` says why; the client sees a plain 401.

    The answer carries ``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750
    section 3.1). The detail says only whether the token expired, since the other reasons
    help an attacker more than a legitimate client.
    """

    def __init__(self, reason: TokenRejection, message: str = "") -> None:
        self.reason = reason
        self.message = message or reason.value
        super().__init__(
            _DETAILS.get(reason, "The access token is not valid."),
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    def __repr__(self) -> str:
        return f"InvalidToken({self.reason.value!r}, {self.message!r})"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode_strict(segment: str) -> bytes:
    """Decode unpadded base64url, refusing any other spelling of the same bytes."""
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not canonical base64url")
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc
    if _b64url(decoded) != segment:  # non-zero unused bits: a second encoding of the bytes
        raise ValueError("not canonical base64url")
    return decoded


def _no_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member {key!r}")
        result[key] = value
    return result


def _thumbprint(members: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace."""
    canonical = json.dumps(dict(sorted(members.items())), separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _public_members(public_key: PublicKey) -> tuple[TokenAlgorithm, dict[str, str]]:
    if isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "EdDSA", {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    ):
        numbers = public_key.public_numbers()
        return "ES256", {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }
    raise ValueError("token keys must be Ed25519 or P-256")


@dataclass(frozen=True)
class TokenKey:
    """One key of the ring. ``private_key`` is None for keys known only by their public
    half (for instance read from another service's JWKS)."""

    kid: str
    alg: TokenAlgorithm
    public_key: PublicKey = field(repr=False)
    private_key: PrivateKey | None = field(default=None, repr=False)
    verify_until: dt.datetime | None = None

    @classmethod
    def generate(cls, alg: TokenAlgorithm = "EdDSA") -> TokenKey:
        private: PrivateKey
        if alg == "EdDSA":
            private = Ed25519PrivateKey.generate()
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported token algorithm {alg!r}")
        return cls.from_private_key(private)

    @classmethod
    def from_private_key(
        cls, private_key: PrivateKey, *, verify_until: dt.datetime | None = None
    ) -> TokenKey:
        public_key = private_key.public_key()
        alg, members = _public_members(public_key)
        return cls(
            kid=_thumbprint(members),
            alg=alg,
            public_key=public_key,
            private_key=private_key,
            verify_until=verify_until,
        )

    @classmethod
    def from_pem(
        cls,
        pem: str | bytes,
        *,
        password: bytes | None = None,
        verify_until: dt.datetime | None = None,
    ) -> TokenKey:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        private = serialization.load_pem_private_key(data, password=password)
        if not isinstance(private, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("token signing keys must be Ed25519 or P-256 private keys")
        return cls.from_private_key(private, verify_until=verify_until)

    @classmethod
    def from_public_jwk(cls, jwk: Mapping[str, Any]) -> TokenKey:
        """A verification-only key from a JWK; refuses keys not meant for signatures."""
        use = jwk.get("use")
        if use is not None and use != "sig":
            raise ValueError(f"key use is {use!r}, not 'sig'")
        key_ops = jwk.get("key_ops")
        if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
            raise ValueError("key_ops does not allow 'verify'")
        if "d" in jwk:
            raise ValueError("a public JWK must not carry the private key")
        kty, crv = jwk.get("kty"), jwk.get("crv")
        public: PublicKey
        try:
            if kty == "OKP" and crv == "Ed25519":
                public = Ed25519PublicKey.from_public_bytes(_b64url_decode_strict(jwk["x"]))
            elif kty == "EC" and crv == "P-256":
                x = _b64url_decode_strict(jwk["x"])
                y = _b64url_decode_strict(jwk["y"])
                if len(x) != 32 or len(y) != 32:
                    raise ValueError("P-256 coordinates are 32 bytes")
                public = ec.EllipticCurvePublicNumbers(
                    int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
                ).public_key()
            else:
                raise ValueError(f"unsupported key type {kty!r}/{crv!r}")
        except (KeyError, TypeError) as exc:
            raise ValueError("incomplete JWK") from exc
        alg, members = _public_members(public)
        declared = jwk.get("alg")
        if declared is not None and declared != alg:
            raise ValueError(f"key declares alg {declared!r} but is an {alg} key")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError("kid must be a string")
        return cls(kid=kid or _thumbprint(members), alg=alg, public_key=public)

    def private_pem(self, password: bytes | None = None) -> bytes:
        if self.private_key is None:
            raise ValueError(f"key {self.kid} has no private half")
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def public_jwk(self) -> dict[str, str]:
        _, members = _public_members(self.public_key)
        return {**members, "kid": self.kid, "use": "sig", "alg": self.alg}

    def verifies_at(self, moment: dt.datetime) -> bool:
        return self.verify_until is None or moment < self.verify_until

    def verify_raw(self, message: bytes, signature: bytes) -> bool:
        """Check a bare signature with the same PyJWT primitive the token path uses."""
        implementation = _ALGORITHM_IMPLEMENTATIONS[self.alg]
        return bool(implementation.verify(message, self.public_key, signature))


@dataclass(frozen=True)
class VerifiedJws:
    """A compact JWS whose signature checked out against a key of the ring."""

    header: Mapping[str, Any]
    payload: bytes
    key: TokenKey


@dataclass(frozen=True)
class VerifiedToken:
    """The claims of a verified access token."""

    kid: str
    subject: str
    issuer: str
    audience: tuple[str, ...]
    issued_at: dt.datetime
    expires_at: dt.datetime
    jti: str
    claims: Mapping[str, Any]


_PYJWT_REJECTIONS: Final[tuple[tuple[type[Exception], TokenRejection], ...]] = (
    # Order matters: InvalidSignatureError is a DecodeError, the rest are InvalidTokenError.
    (jwt.InvalidSignatureError, TokenRejection.bad_signature),
    (jwt.InvalidAlgorithmError, TokenRejection.unsupported_algorithm),
    (jwt.InvalidAudienceError, TokenRejection.wrong_audience),
    (jwt.InvalidIssuerError, TokenRejection.wrong_issuer),
    (jwt.MissingRequiredClaimError, TokenRejection.missing_claim),
    (jwt.InvalidTokenError, TokenRejection.malformed),
    (jwt.InvalidKeyError, TokenRejection.malformed),
)


def _rejection_for(exc: Exception) -> TokenRejection:
    for kind, reason in _PYJWT_REJECTIONS:
        if isinstance(exc, kind):
            return reason
    return TokenRejection.malformed


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """The time claim ``name`` in seconds since the epoch, or ``None`` when absent.

    Anything but a number from the epoch to :data:`NUMERIC_DATE_MAX` is malformed: a
    signed token can still carry ``exp: 1e20`` or an integer of 400 digits, and reading
    that as a datetime (or even as a float) would raise instead of refusing the token.
    The range test also refuses NaN and the infinities, and never converts a huge
    integer to a float."""
    value = claims.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= NUMERIC_DATE_MAX
    ):
        raise InvalidToken(TokenRejection.malformed, f"{name} is not a NumericDate in range")
    return float(value)


def _type_matches(declared: Any, expected: str) -> bool:
    # RFC 7515 section 4.1.9: "application/" may be omitted, and media types compare
    # case-insensitively.
    if not isinstance(declared, str):
        return False
    wanted = expected.lower().removeprefix("application/")
    return bool(declared.lower().removeprefix("application/") == wanted)


class KeyRing:
    """The keys tokens are signed and verified with. Not thread-safe for mutation:
    rotate at start-up or under the caller's lock, then share read-only. Verifying is
    safe from any thread: the tokens it remembers are kept with single dict operations."""

    def __init__(self, keys: Iterable[TokenKey] = (), *, active_kid: str | None = None) -> None:
        self._keys: dict[str, TokenKey] = {}
        for key in keys:
            if key.kid in self._keys:
                raise ValueError(f"two keys share kid {key.kid!r}")
            self._keys[key.kid] = key
        if active_kid is not None:
            active = self._keys.get(active_kid)
            if active is None or active.private_key is None:
                raise ValueError("the active key must be in the ring with its private half")
            if active.verify_until is not None:
                raise ValueError("the active key cannot have a verification deadline")
        self._active_kid = active_kid
        # Tokens that verified, by token and checks: see verify.
        self._verified: dict[tuple[Any, ...], tuple[TokenKey, Mapping[str, Any]]] = {}

    # -- construction and persistence ---------------------------------------------------

    @classmethod
    def generate(cls, alg: TokenAlgorithm = "EdDSA") -> KeyRing:
        key = TokenKey.generate(alg)
        return cls([key], active_kid=key.kid)

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> KeyRing:
        """A verification-only ring from a JWKS; keys not usable for our signatures (RSA,
        encryption keys, other curves) are left out rather than trusted."""
        keys = []
        for jwk in jwks.get("keys", []):
            try:
                keys.append(TokenKey.from_public_jwk(jwk))
            except ValueError:
                continue
        return cls(keys)

    @classmethod
    def from_pem_bundle(cls, bundle: str, *, password: bytes | None = None) -> KeyRing:
        """Read PEM private keys; the first signs, the others only verify.

        A ``verify-until: <ISO 8601>`` line before a block sets when that retired key
        stops verifying (RFC 7468 lets text sit between blocks).
        """
        keys: list[TokenKey] = []
        position = 0
        for match in _PEM_BLOCK.finditer(bundle):
            preamble = bundle[position : match.start()]
            position = match.end()
            deadline = None
            found = _VERIFY_UNTIL_LINE.findall(preamble)
            if found:
                deadline = ensure_utc(dt.datetime.fromisoformat(found[-1]))
            keys.append(TokenKey.from_pem(match.group(0), password=password, verify_until=deadline))
        if not keys:
            raise ValueError("no PEM private key found")
        return cls(keys, active_kid=keys[0].kid)

    def pem_bundle(self, *, password: bytes | None = None) -> str:
        ordered = sorted(self._keys.values(), key=lambda key: key.kid != self._active_kid)
        parts = []
        for key in ordered:
            if key.private_key is None:
                continue
            lines = [f"kid: {key.kid}"]
            if key.verify_until is not None:
                lines.append(f"verify-until: {key.verify_until.isoformat()}")
            parts.append("\n".join(lines) + "\n" + key.private_pem(password).decode("ascii"))
        return "".join(parts)

    # -- the ring -----------------------------------------------------------------------

    @property
    def active(self) -> TokenKey:
        if self._active_kid is None:
            raise ValueError("this key ring only verifies: it has no signing key")
        return self._keys[self._active_kid]

    def known_keys(self) -> Sequence[TokenKey]:
        return tuple(self._keys.values())

    def get(self, kid: str) -> TokenKey | None:
        return self._keys.get(kid)

    def add(self, key: TokenKey, *, activate: bool = False) -> None:
        if key.kid in self._keys:
            raise ValueError(f"kid {key.kid!r} is already in the ring")
        if activate and key.private_key is None:
            raise ValueError("only a key with its private half can sign")
        self._keys[key.kid] = key
        if activate:
            self._active_kid = key.kid

    def rotate(
        self,
        *,
        clock: Clock,
        retain_for: dt.timedelta,
        alg: TokenAlgorithm | None = None,
        new_key: TokenKey | None = None,
    ) -> TokenKey:
        """Make a new key the signer; the old signer verifies for ``retain_for`` more,
        which must be at least the longest token lifetime plus the verification leeway."""
        if retain_for < dt.timedelta(0):
            raise ValueError("retain_for cannot be negative")
        key = new_key or TokenKey.generate(
            alg or (self.active.alg if self._active_kid else "EdDSA")
        )
        if key.private_key is None:
            raise ValueError("only a key with its private half can sign")
        previous = self._active_kid
        self.add(key, activate=True)
        if previous is not None:
            old = self._keys[previous]
            self._keys[previous] = replace(old, verify_until=ensure_utc(clock.now()) + retain_for)
        return key

    def remove(self, kid: str) -> None:
        if kid == self._active_kid:
            raise ValueError("rotate before removing the signing key")
        self._keys.pop(kid, None)

    def prune(self, clock: Clock) -> list[str]:
        """Forget retired keys whose verification deadline has passed."""
        now = ensure_utc(clock.now())
        gone = [kid for kid, key in self._keys.items() if not key.verifies_at(now)]
        for kid in gone:
            del self._keys[kid]
        return gone

    def jwks(self, clock: Clock | None = None) -> dict[str, list[dict[str, str]]]:
        """The public keys as an RFC 7517 JWK Set, signing key first; given a clock, only
        the keys that still verify at its time."""
        now = ensure_utc(clock.now()) if clock is not None else None
        ordered = sorted(self._keys.values(), key=lambda key: key.kid != self._active_kid)
        return {
            "keys": [key.public_jwk() for key in ordered if now is None or key.verifies_at(now)]
        }

    # -- issuing ------------------------------------------------------------------------

    def issue(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        ttl: dt.timedelta,
        clock: Clock,
        issuer: str,
        audience: str | Sequence[str],
        subject: str,
        jti: str | None = None,
        token_type: str = ACCESS_TOKEN_TYPE,
    ) -> str:
        """Sign a JWT with the active key. Registered claims come from the arguments only,
        so a caller cannot set ``exp`` or ``aud`` through ``claims`` by accident."""
        claims = dict(claims or {})
        clash = REGISTERED_CLAIMS & claims.keys()
        if clash:
            raise ValueError(f"set {sorted(clash)} through the arguments, not claims")
        if ttl <= dt.timedelta(0):
            raise ValueError("ttl must be positive")
        if not subject or not issuer or not audience:
            raise ValueError("subject, issuer and audience are required")
        key = self.active
        if key.private_key is None:  # the constructor forbids it; this narrows the type
            raise ValueError("the signing key has no private half")
        issued_at = math.floor(ensure_utc(clock.now()).timestamp())
        payload = {
            **claims,
            "iss": issuer,
            "sub": subject,
            "aud": audience if isinstance(audience, str) else list(audience),
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + math.ceil(ttl.total_seconds()),
            "jti": jti or secrets.token_urlsafe(18),
        }
        headers = {"kid": key.kid, "typ": token_type}
        return jwt.encode(payload, key.private_key, algorithm=key.alg, headers=headers)

    # -- verifying ----------------------------------------------------------------------

    def _read_header(self, token: str) -> tuple[dict[str, Any], TokenKey]:
        if not isinstance(token, str) or token.count(".") != 2:
            raise InvalidToken(TokenRejection.malformed, "not a compact JWS")
        try:
            raw = _b64url_decode_strict(token.split(".", 1)[0])
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_members)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidToken(TokenRejection.malformed, f"header: {exc}") from None
        if not isinstance(header, dict):
            raise InvalidToken(TokenRejection.malformed, "header is not a JSON object")
        refused = _REFUSED_HEADERS & header.keys()
        if refused:
            raise InvalidToken(TokenRejection.refused_header, f"header carries {sorted(refused)}")
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise InvalidToken(TokenRejection.unsupported_algorithm, f"alg {alg!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken(TokenRejection.malformed, "no kid")
        key = self._keys.get(kid)
        if key is None:
            raise InvalidToken(TokenRejection.unknown_key, f"kid {kid!r}")
        if alg != key.alg:
            # The key decides the algorithm, never the header (algorithm confusion).
            raise InvalidToken(TokenRejection.unsupported_algorithm, f"{alg} with a {key.alg} key")
        return header, key

    def _usable(self, key: TokenKey, clock: Clock) -> None:
        if not key.verifies_at(ensure_utc(clock.now())):
            raise InvalidToken(TokenRejection.unknown_key, f"kid {key.kid!r} is retired")

    def verify_jws(self, token: str, *, clock: Clock) -> VerifiedJws:
        """Check a compact JWS's signature only; the payload may be any bytes."""
        header, key = self._read_header(token)
        self._usable(key, clock)
        try:
            decoded = jwt.PyJWS().decode_complete(token, key.public_key, algorithms=[key.alg])
        except (jwt.PyJWTError, ValueError) as exc:
            raise InvalidToken(_rejection_for(exc), str(exc)) from None
        return VerifiedJws(header=header, payload=decoded["payload"], key=key)

    def verify(
        self,
        token: str,
        *,
        audience: str,
        issuer: str,
        clock: Clock,
        leeway: dt.timedelta = DEFAULT_LEEWAY,
        token_type: str = ACCESS_TOKEN_TYPE,
        required: Sequence[str] = DEFAULT_REQUIRED_CLAIMS,
    ) -> VerifiedToken:
        """Verify signature, type, audience, issuer and times; raise :class:`InvalidToken`.

        ``exp`` passes while ``now < exp + leeway``; ``nbf`` and ``iat`` may be at most
        ``leeway`` ahead of ``now``. ``exp``, ``iat``, ``sub`` and ``jti`` are always
        required (the result carries them); ``required`` may add more.

        A token whose signature, type, audience and issuer checked out is remembered
        (the last ``VERIFIED_TOKENS_REMEMBERED`` of them): a client sends the same access
        token with every request for its whole life, and checking its signature again
        each time cost 0.2 ms, a sixth of a ``GET /me``. The times and the key's
        retirement are checked on every call, and a remembered token whose key has
        left the ring or been replaced (retired by a rotation) is checked in full again.
        Only tokens that verified are remembered, so forged ones cannot fill the memory.
        """
        if leeway < dt.timedelta(0):
            raise ValueError("leeway cannot be negative")
        memo = (token, audience, issuer, token_type, tuple(required))
        remembered = self._verified.get(memo)
        if remembered is not None and self._keys.get(remembered[0].kid) is remembered[0]:
            key, claims = remembered
            self._usable(key, clock)
        else:
            key, claims = self._decode(
                token, audience=audience, issuer=issuer, clock=clock,
                token_type=token_type, required=required,
            )  # fmt: skip
            self._remember(memo, key, claims)
        return _checked_times(key, claims, clock, leeway)

    def _decode(
        self,
        token: str,
        *,
        audience: str,
        issuer: str,
        clock: Clock,
        token_type: str,
        required: Sequence[str],
    ) -> tuple[TokenKey, Mapping[str, Any]]:
        """The key and the claims of ``token``, its signature, type, audience, issuer and
        required claims checked (not its times)."""
        header, key = self._read_header(token)
        self._usable(key, clock)
        if not _type_matches(header.get("typ"), token_type):
            raise InvalidToken(TokenRejection.wrong_type, f"typ {header.get('typ')!r}")
        try:
            decoded = jwt.PyJWT().decode_complete(
                token,
                key.public_key,
                algorithms=[key.alg],
                audience=audience,
                issuer=issuer,
                options={
                    # Times are checked by _checked_times against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": True,
                    "verify_iss": True,
                    "require": list(required),
                },
            )
        except (jwt.PyJWTError, ValueError) as exc:
            raise InvalidToken(_rejection_for(exc), str(exc)) from None
        # Read-only: the same claims are handed to every caller of a remembered token.
        return key, MappingProxyType(decoded["payload"])

    def _remember(self, memo: tuple[Any, ...], key: TokenKey, claims: Mapping[str, Any]) -> None:
        verified = self._verified
        while len(verified) >= VERIFIED_TOKENS_REMEMBERED:
            try:  # the oldest first (dicts keep insertion order)
                del verified[next(iter(verified))]
            except (StopIteration, KeyError, RuntimeError):
                break
        verified[memo] = (key, claims)


def _checked_times(
    key: TokenKey, claims: Mapping[str, Any], clock: Clock, leeway: dt.timedelta
) -> VerifiedToken:
    now = ensure_utc(clock.now()).timestamp()
    slack = leeway.total_seconds()
    expires = _numeric_date(claims, "exp")
    not_before = _numeric_date(claims, "nbf")
    issued = _numeric_date(claims, "iat")
    if expires is not None and now >= expires + slack:
        raise InvalidToken(TokenRejection.expired, f"exp {expires} at {now}")
    if not_before is not None and now + slack < not_before:
        raise InvalidToken(TokenRejection.not_yet_valid, f"nbf {not_before} at {now}")
    if issued is not None and issued > now + slack:
        raise InvalidToken(TokenRejection.issued_in_future, f"iat {issued} at {now}")
    if expires is None or issued is None:
        raise InvalidToken(TokenRejection.missing_claim, "exp and iat are required")
    subject = claims.get("sub")
    jti = claims.get("jti")
    if not isinstance(subject, str) or not isinstance(jti, str):
        raise InvalidToken(TokenRejection.missing_claim, "sub and jti are required")
    aud = claims["aud"]
    return VerifiedToken(
        kid=key.kid,
        subject=subject,
        issuer=claims["iss"],
        audience=(aud,) if isinstance(aud, str) else tuple(aud),
        issued_at=dt.datetime.fromtimestamp(issued, dt.UTC),
        expires_at=dt.datetime.fromtimestamp(expires, dt.UTC),
        jti=jti,
        claims=claims,
    )


# -- keys kept in the data directory ----------------------------------------------------

SIGNING_KEYS_FILE: Final = "token_signing_keys.pem"


def load_or_create_keyring(path: Path, *, alg: TokenAlgorithm = "EdDSA") -> KeyRing:
    """Read the ring from ``path``, creating it with one fresh key on first use.

    For development: the file is written whole (mode 0600) before it appears, so API
    processes starting together on a new data directory all end up with the first one's
    ring, and looser modes found later are tightened. Production configures its keys
    instead.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        ring = KeyRing.generate(alg)
        if publish_once(path, ring.pem_bundle()):
            return ring
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
    return KeyRing.from_pem_bundle(path.read_text(encoding="ascii"))


def save_keyring(ring: KeyRing, path: Path) -> None:
    """Replace the file atomically (after a rotation), keeping mode 0600 throughout."""
    replace_private(path, ring.pem_bundle())
