"""Social sign-in through OpenID Connect: one adapter, configured per provider.

Google and Apple are two configurations of :class:`OidcProvider`; any provider that
publishes ``/.well-known/openid-configuration`` works the same way. The flow is the
authorization code flow with PKCE (S256), a ``state`` and a ``nonce``; all three are kept
server-side (:func:`remember_authorization` / :func:`take_authorization`), never trusted
from the client.

Libraries. HTTP goes through ``httpx2`` (authlib's httpx integration imports ``httpx``,
which Soko does not install), with an injectable transport so tests reach a provider
running in-process. JOSE is ``joserfc``, the library authlib 1.9 itself builds on
(``authlib.jose`` is deprecated and warns on import), and the ID token rules (iss, aud,
azp, exp, iat, nonce, at_hash) are authlib's own :class:`CodeIDToken`, given the injected
clock rather than the system time.

Verification trusts nothing the token says about keys: the algorithm must be one of
:data:`ALLOWED_ALGORITHMS` (so ``none`` and HS256 keyed with a public key are refused
before any key is looked at), the key is taken from the provider's JWKS by ``kid`` and
must be of the algorithm's type, and a token naming its own key (``jwk``, ``jku``,
``x5u``, ``x5c``) is refused. Discovery is cached for a day and the JWKS for an hour; an
unknown ``kid`` refetches the JWKS once (providers rotate keys), at most once per
``jwks_refresh_cooldown`` so a stream of made-up kids cannot make us hammer the provider.

Linking rule (applied by the callback route):

1. A known ``(provider, subject)`` signs in the user it is linked to, whatever the email.
2. Otherwise, when the provider says the email is verified (``email_verified`` true, or
   Apple's string ``"true"``), the account with that email is linked and signed in; if
   there is none, a new account is created with the email already verified.
3. Otherwise (no email, or one the provider has not verified) a new account is created
   *without* the email, and linked. An unverified email never links to an existing
   account, and never claims an address: keeping it would let someone who typed another
   person's address at the provider lock the real owner out of registering it. The user
   can add and verify an email later.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Generic, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx2
from authlib.oidc.core import CodeIDToken  # type: ignore[import-untyped]
from joserfc import jws, jwt
from joserfc.errors import ClaimError, ExpiredTokenError, JoseError
from joserfc.jwk import ECKey, Key, RSAKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from soko.platform.admission import working_elsewhere
from soko.platform.cache import Cache
from soko.platform.clock import Clock

T = TypeVar("T")

ALLOWED_ALGORITHMS: Final = ("RS256", "ES256")
APPLE_ISSUER: Final = "https://appleid.apple.com"
DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
DISCOVERY_TTL: Final = dt.timedelta(hours=24)
JWKS_TTL: Final = dt.timedelta(hours=1)
JWKS_REFRESH_COOLDOWN: Final = dt.timedelta(seconds=30)
AUTHORIZATION_TTL: Final = dt.timedelta(minutes=10)
# Apple accepts client secrets valid for up to six months; one minted per token request
# only needs to outlive that request.
APPLE_CLIENT_SECRET_TTL: Final = dt.timedelta(minutes=5)
MAX_RESPONSE_BYTES: Final = 1_048_576
MAX_ID_TOKEN_BYTES: Final = 16_384
HTTP_TIMEOUT_SECONDS: Final = 10.0

_REFUSED_HEADERS: Final = frozenset({"jwk", "jku", "x5u", "x5c", "crit", "b64"})
_KEY_TYPES: Final = {"RS256": "RSA", "ES256": "EC"}
# A session records its method as "oidc:<name>" in 32 characters.
_PROVIDER_NAME: Final = re.compile(r"[a-z][a-z0-9-]{0,26}")
# Parameters the adapter sets itself; a configuration may not override them.
_RESERVED_AUTHORIZE_PARAMS: Final = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
    }
)
_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})


# -- outcomes -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OidcIdentity:
    """Who the provider says signed in. ``email`` is only as good as ``email_verified``."""

    provider: str
    subject: str
    email: str | None
    email_verified: bool
    name: str | None


@dataclass(frozen=True, slots=True)
class OidcAuthorization:
    """One started sign-in: the URL to send the user to and the secrets that finish it."""

    provider: str
    url: str
    state: str
    nonce: str
    code_verifier: str | None
    redirect_uri: str
    expires_at: dt.datetime


class OidcRejection(StrEnum):
    """Why a sign-in was refused; logged, never needed by the client."""

    malformed = "malformed"
    unsupported_algorithm = "unsupported_algorithm"
    refused_header = "refused_header"
    unknown_key = "unknown_key"
    bad_signature = "bad_signature"
    expired = "expired"
    invalid_claim = "invalid_claim"
    missing_claim = "missing_claim"
    bad_discovery = "bad_discovery"
    token_refused = "token_refused"
    bad_token_response = "bad_token_response"
    unknown_state = "unknown_state"
    bad_redirect_uri = "bad_redirect_uri"


class OidcError(Exception):
    """The provider's answer cannot be trusted, or the flow does not match."""

    def __init__(self, reason: OidcRejection, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class OidcProviderUnavailable(Exception):
    """The provider could not be reached or answered with a server error."""


class UnknownOidcProvider(LookupError):
    """No provider of that name is configured."""


# -- configuration --------------------------------------------------------------------


class OidcProviderConfig(BaseModel):
    """One provider, as configured. Apple's client secret is itself a JWT: configure
    ``client_secret_jwt_key`` (the ``.p8`` key's PEM), ``team_id`` and ``key_id`` instead
    of ``client_secret`` and one is minted for every token request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    issuer: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_secret_jwt_key: SecretStr | None = None
    team_id: str | None = None
    key_id: str | None = None
    redirect_uris: tuple[str, ...] = Field(min_length=1)
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    authorize_params: dict[str, str] = Field(default_factory=dict)
    token_endpoint_auth_method: Literal["client_secret_post", "client_secret_basic"] = (
        "client_secret_post"
    )
    pkce: bool = True
    # Google documents ID tokens whose iss is "accounts.google.com" without the scheme.
    issuer_aliases: tuple[str, ...] = ()
    leeway_seconds: int = Field(60, ge=0, le=300)
    allow_http: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _PROVIDER_NAME.fullmatch(value):
            raise ValueError("must be lowercase letters, digits and dashes (at most 27)")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in value:
            raise ValueError("must include 'openid'")
        return value

    @field_validator("authorize_params")
    @classmethod
    def _authorize_params(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(_RESERVED_AUTHORIZE_PARAMS & value.keys())
        if reserved:
            raise ValueError(f"may not set {', '.join(reserved)}: the adapter sets them")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> OidcProviderConfig:
        _check_url(self.issuer, "issuer", allow_http=self.allow_http, query=False)
        for uri in self.redirect_uris:
            _check_redirect_uri(uri, allow_http=self.allow_http)
        minted = (self.client_secret_jwt_key, self.team_id, self.key_id)
        if any(part is not None for part in minted):
            if not all(part is not None for part in minted):
                raise ValueError("client_secret_jwt_key, team_id and key_id go together")
            if self.client_secret is not None:
                raise ValueError("set client_secret or client_secret_jwt_key, not both")
            assert self.client_secret_jwt_key is not None
            _load_p256_key(self.client_secret_jwt_key.get_secret_value())
        elif self.client_secret is None:
            raise ValueError("client_secret (or client_secret_jwt_key) is required")
        return self

    @property
    def mints_client_secret(self) -> bool:
        return self.client_secret_jwt_key is not None


def parse_oidc_providers(
    raw: Mapping[str, Any] | str, *, allow_http: bool = False
) -> dict[str, OidcProviderConfig]:
    """Providers from ``{"google": {...}, "apple": {...}}`` (a dict or its JSON text).

    ``allow_http`` admits plain-http issuers and redirect URIs (development and tests);
    production should pass ``False``. Raises ``ValueError`` with one line per problem,
    each naming the provider and the field.
    """
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"is not JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ValueError('must be an object such as {"google": {"issuer": ...}}')
    providers: dict[str, OidcProviderConfig] = {}
    problems: list[str] = []
    for name, values in raw.items():
        if not isinstance(values, Mapping):
            problems.append(f"{name}: must be an object")
            continue
        data = {"allow_http": allow_http, **values, "name": name}
        try:
            providers[name] = OidcProviderConfig.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"])
                message = error["msg"].removeprefix("Value error, ")
                problems.append(f"{name}{'.' + where if where else ''}: {message}")
    if problems:
        raise ValueError("; ".join(problems))
    return providers


def _check_url(url: str, what: str, *, allow_http: bool, query: bool = True) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute https URL")
    if parts.scheme == "http" and not allow_http:
        raise ValueError(f"{what} must use https")
    if parts.fragment or (not query and parts.query):
        raise ValueError(f"{what} may not carry a {'fragment' if parts.fragment else 'query'}")


def _check_redirect_uri(uri: str, *, allow_http: bool) -> None:
    parts = urlsplit(uri)
    if not parts.scheme or parts.fragment:
        raise ValueError(f"redirect URI {uri!r} must be absolute and without a fragment")
    if parts.scheme == "http" and not (allow_http or parts.hostname in _LOOPBACK_HOSTS):
        # RFC 8252 section 7.3: native apps may use plain http on the loopback address.
        raise ValueError(f"redirect URI {uri!r} must use https (or a loopback address)")
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise ValueError(f"redirect URI {uri!r} has no host")


def _load_p256_key(pem: str) -> ECKey:
    try:
        key = ECKey.import_key(pem)
    except (JoseError, ValueError, TypeError):
        raise ValueError("client_secret_jwt_key is not a PEM EC private key") from None
    if key.curve_name != "P-256" or not key.is_private:
        raise ValueError("client_secret_jwt_key must be a P-256 private key")
    return key


# -- the adapter ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The parts of the discovery document the adapter uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str


@dataclass(frozen=True, slots=True)
class TokenResponse:
    id_token: str
    access_token: str | None


@dataclass(frozen=True, slots=True)
class _Fetched(Generic[T]):
    value: T
    fetched_at: dt.datetime


class OidcProvider:
    """One configured provider: authorization URLs, code exchange, ID token checks."""

    def __init__(
        self,
        config: OidcProviderConfig,
        *,
        http: httpx2.AsyncClient,
        clock: Clock,
        jwks_refresh_cooldown: dt.timedelta = JWKS_REFRESH_COOLDOWN,
    ) -> None:
        self.config = config
        self.name = config.name
        self._http = http
        self._clock = clock
        self._jwks_refresh_cooldown = jwks_refresh_cooldown
        self._metadata: _Fetched[ProviderMetadata] | None = None
        self._keys: _Fetched[tuple[Key, ...]] | None = None
        self._lock = asyncio.Lock()

    # -- starting and finishing a sign-in ---------------------------------------------

    async def authorization(self, redirect_uri: str | None = None) -> OidcAuthorization:
        """A fresh state, nonce and PKCE verifier, and the URL that starts the sign-in.

        ``redirect_uri`` must be one of the configured ones (exact match); by default the
        first. The caller keeps the result server-side until the callback.
        """
        if redirect_uri is None:
            redirect_uri = self.config.redirect_uris[0]
        elif redirect_uri not in self.config.redirect_uris:
            raise OidcError(OidcRejection.bad_redirect_uri, "not a configured redirect URI")
        metadata = await self.metadata()
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        params = {
            **self.config.authorize_params,
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "nonce": nonce,
        }
        verifier = None
        if self.config.pkce:
            verifier = secrets.token_urlsafe(64)
            params["code_challenge"] = pkce_challenge(verifier)
            params["code_challenge_method"] = "S256"
        return OidcAuthorization(
            provider=self.name,
            url=_with_query(metadata.authorization_endpoint, params),
            state=state,
            nonce=nonce,
            code_verifier=verifier,
            redirect_uri=redirect_uri,
            expires_at=self._clock.now() + AUTHORIZATION_TTL,
        )

    async def sign_in(self, code: str, authorization: OidcAuthorization) -> OidcIdentity:
        """Exchange the code from the callback and verify the ID token it buys."""
        if authorization.provider != self.name:
            raise OidcError(OidcRejection.unknown_state, "state belongs to another provider")
        tokens = await self.exchange_code(
            code,
            redirect_uri=authorization.redirect_uri,
            code_verifier=authorization.code_verifier,
        )
        return await self.verify_id_token(
            tokens.id_token, nonce=authorization.nonce, access_token=tokens.access_token
        )

    async def exchange_code(
        self, code: str, *, redirect_uri: str, code_verifier: str | None
    ) -> TokenResponse:
        if not code or len(code) > 2048:
            raise OidcError(OidcRejection.malformed, "missing or oversized code")
        metadata = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
        }
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        secret = self.client_secret()
        auth: tuple[str, str] | None = None
        if self.config.token_endpoint_auth_method == "client_secret_basic":
            auth = (self.config.client_id, secret)
        else:
            form["client_id"] = self.config.client_id
            form["client_secret"] = secret
        status, body = await self._request(
            "POST",
            metadata.token_endpoint,
            data=form,
            auth=auth,
            headers={"Accept": "application/json"},
        )
        if 400 <= status < 500:
            error = body.get("error") if isinstance(body, dict) else None
            raise OidcError(OidcRejection.token_refused, f"token endpoint said {error!r}")
        if status != 200 or not isinstance(body, dict):
            raise OidcProviderUnavailable(f"{self.name} token endpoint answered {status}")
        id_token = body.get("id_token")
        access_token = body.get("access_token")
        token_type = body.get("token_type")
        if not isinstance(id_token, str) or not id_token:
            raise OidcError(OidcRejection.bad_token_response, "no id_token")
        if access_token is not None and not isinstance(access_token, str):
            raise OidcError(OidcRejection.bad_token_response, "access_token is not a string")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise OidcError(OidcRejection.bad_token_response, f"token_type {token_type!r}")
        return TokenResponse(id_token=id_token, access_token=access_token)

    def client_secret(self) -> str:
        """The secret sent to the token endpoint; for Apple, a freshly minted JWT."""
        if self.config.client_secret is not None:
            return self.config.client_secret.get_secret_value()
        assert self.config.client_secret_jwt_key is not None
        assert self.config.team_id is not None and self.config.key_id is not None
        key = _load_p256_key(self.config.client_secret_jwt_key.get_secret_value())
        now = int(self._clock.now().timestamp())
        claims = {
            "iss": self.config.team_id,
            "iat": now,
            "exp": now + int(APPLE_CLIENT_SECRET_TTL.total_seconds()),
            # Apple wants its issuer here; the configured issuer is it for Apple.
            "aud": self.config.issuer,
            "sub": self.config.client_id,
        }
        return jwt.encode(
            {"alg": "ES256", "kid": self.config.key_id}, claims, key, algorithms=["ES256"]
        )

    # -- ID tokens --------------------------------------------------------------------

    async def verify_id_token(
        self, id_token: str, *, nonce: str, access_token: str | None = None
    ) -> OidcIdentity:
        """Check an ID token's signature and claims; raise :class:`OidcError` if any fails.

        ``nonce`` is required: every flow this adapter starts sends one, and a token
        without it (or with another) is a replay.
        """
        if not nonce:
            raise ValueError("a nonce is required")
        if len(id_token) > MAX_ID_TOKEN_BYTES:
            raise OidcError(OidcRejection.malformed, "oversized token")
        try:
            header = jws.extract_compact(id_token.encode("ascii")).headers()
        except (JoseError, ValueError, UnicodeError):
            raise OidcError(OidcRejection.malformed, "not a compact JWS") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise OidcError(OidcRejection.unsupported_algorithm, f"alg {alg!r}")
        refused = sorted(_REFUSED_HEADERS & header.keys())
        if refused:
            raise OidcError(OidcRejection.refused_header, ", ".join(refused))
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise OidcError(OidcRejection.malformed, "kid is not a string")
        key = await self._verification_key(kid, alg)
        try:
            token = jwt.decode(id_token, key, algorithms=[alg])
        except JoseError:
            raise OidcError(OidcRejection.bad_signature) from None
        claims = token.claims
        issuers = [self.config.issuer, *self.config.issuer_aliases]
        checks = CodeIDToken(
            claims,
            token.header,
            options={
                "iss": {"essential": True, "values": issuers},
                "sub": {"essential": True},
                "aud": {"essential": True, "value": self.config.client_id},
                "exp": {"essential": True},
                "iat": {"essential": True},
            },
            params={
                "nonce": nonce,
                "client_id": self.config.client_id,
                "access_token": access_token,
            },
        )
        try:
            checks.validate(
                now=int(self._clock.now().timestamp()), leeway=self.config.leeway_seconds
            )
        except ExpiredTokenError:
            raise OidcError(OidcRejection.expired) from None
        except ClaimError as exc:
            reason = (
                OidcRejection.missing_claim
                if exc.error == "missing_claim"
                else OidcRejection.invalid_claim
            )
            raise OidcError(reason, exc.claim) from None
        return _identity(self.name, claims)

    async def _verification_key(self, kid: str | None, alg: str) -> Key:
        metadata = await self.metadata()
        keys = await self._current_keys(metadata.jwks_uri)
        key = _choose_key(keys.value, kid, alg)
        if key is not None:
            return key
        async with self._lock:
            # Another request may have refetched while this one waited for the lock.
            latest = self._keys or keys
            if latest.fetched_at == keys.fetched_at:
                if self._clock.now() - keys.fetched_at < self._jwks_refresh_cooldown:
                    raise OidcError(OidcRejection.unknown_key, "JWKS fetched too recently")
                latest = await self._fetch_keys(metadata.jwks_uri)
        key = _choose_key(latest.value, kid, alg)
        if key is None:
            raise OidcError(OidcRejection.unknown_key, f"kid {kid!r}")
        return key

    # -- discovery and keys -----------------------------------------------------------

    async def metadata(self) -> ProviderMetadata:
        cached = self._metadata
        if cached is not None and self._clock.now() - cached.fetched_at < DISCOVERY_TTL:
            return cached.value
        async with self._lock:
            cached = self._metadata
            if cached is not None and self._clock.now() - cached.fetched_at < DISCOVERY_TTL:
                return cached.value
            url = self.config.issuer.rstrip("/") + DISCOVERY_PATH
            status, body = await self._request("GET", url)
            if status != 200:
                raise OidcProviderUnavailable(f"{self.name} discovery answered {status}")
            metadata = self._parse_metadata(body)
            self._metadata = _Fetched(metadata, self._clock.now())
            return metadata

    def _parse_metadata(self, body: Any) -> ProviderMetadata:
        if not isinstance(body, dict):
            raise OidcError(OidcRejection.bad_discovery, "not a JSON object")
        # OpenID Connect Discovery 1.0 section 4.3: the document must name the issuer we
        # asked, exactly, or a compromised or confused host could speak for another.
        if body.get("issuer") != self.config.issuer:
            raise OidcError(OidcRejection.bad_discovery, "issuer does not match")
        endpoints = {}
        for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = body.get(field)
            if not isinstance(value, str):
                raise OidcError(OidcRejection.bad_discovery, f"no {field}")
            try:
                _check_url(value, field, allow_http=self.config.allow_http)
            except ValueError as exc:
                raise OidcError(OidcRejection.bad_discovery, str(exc)) from None
            endpoints[field] = value
        return ProviderMetadata(issuer=self.config.issuer, **endpoints)

    async def _current_keys(self, jwks_uri: str) -> _Fetched[tuple[Key, ...]]:
        cached = self._keys
        if cached is not None and self._clock.now() - cached.fetched_at < JWKS_TTL:
            return cached
        async with self._lock:
            cached = self._keys
            if cached is not None and self._clock.now() - cached.fetched_at < JWKS_TTL:
                return cached
            return await self._fetch_keys(jwks_uri)

    async def _fetch_keys(self, jwks_uri: str) -> _Fetched[tuple[Key, ...]]:
        """Fetch the JWKS; the caller holds the lock."""
        status, body = await self._request("GET", jwks_uri)
        if status != 200:
            raise OidcProviderUnavailable(f"{self.name} JWKS answered {status}")
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise OidcError(OidcRejection.bad_discovery, "JWKS has no keys")
        fetched = _Fetched(_signing_keys(body["keys"]), self._clock.now())
        self._keys = fetched
        return fetched

    async def _request(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        """Send a request and read a bounded JSON answer: ``(status, body or None)``."""
        try:
            async with working_elsewhere(), self._http.stream(method, url, **kwargs) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise OidcProviderUnavailable(f"{self.name} answered too much")
                status = response.status_code
        except httpx2.HTTPError as exc:
            raise OidcProviderUnavailable(f"{self.name}: {type(exc).__name__}") from exc
        if status >= 500:
            raise OidcProviderUnavailable(f"{self.name} answered {status}")
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None


def _signing_keys(entries: Sequence[Any]) -> tuple[Key, ...]:
    """The usable signature keys of a JWKS; others (encryption keys, unknown types,
    malformed entries) are skipped rather than failing the whole set."""
    keys: list[Key] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        if any(private in entry for private in ("d", "p", "q")):
            continue  # a provider publishing private material is broken; do not use it
        try:
            key: Key = (
                RSAKey.import_key(entry) if entry["kty"] == "RSA" else ECKey.import_key(entry)
            )
        except (JoseError, ValueError, TypeError, KeyError):
            continue
        keys.append(key)
    return tuple(keys)


def _choose_key(keys: Sequence[Key], kid: str | None, alg: str) -> Key | None:
    candidates = [
        key
        for key in keys
        if key.key_type == _KEY_TYPES[alg]
        and key.get("alg") in (None, alg)
        and (not isinstance(key, ECKey) or key.curve_name == "P-256")
        and (kid is None or key.kid == kid)
    ]
    if kid is None and len(candidates) != 1:
        return None  # without a kid, only an unambiguous key will do
    return candidates[0] if candidates else None


def _identity(provider: str, claims: Mapping[str, Any]) -> OidcIdentity:
    subject = claims["sub"]
    if not isinstance(subject, str) or not 0 < len(subject) <= 255:
        raise OidcError(OidcRejection.invalid_claim, "sub")
    email = claims.get("email")
    if not isinstance(email, str) or not email.strip():
        email = None
    name = claims.get("name")
    if not isinstance(name, str) or not name.strip():
        parts = [claims.get("given_name"), claims.get("family_name")]
        name = " ".join(part for part in parts if isinstance(part, str) and part) or None
    return OidcIdentity(
        provider=provider,
        subject=subject,
        email=email.strip() if email else None,
        email_verified=email is not None and email_is_verified(claims.get("email_verified")),
        name=name.strip()[:120] if name else None,
    )


def email_is_verified(value: Any) -> bool:
    """OIDC says a boolean; Apple has sent the string ``"true"``. Anything else is no."""
    if isinstance(value, bool):
        return value
    return isinstance(value, str) and value.strip().lower() == "true"


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: base64url(SHA-256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- the registry ---------------------------------------------------------------------


class OidcProviders:
    """Every configured provider, sharing one HTTP client."""

    def __init__(
        self,
        configs: Mapping[str, OidcProviderConfig],
        *,
        clock: Clock,
        transport: httpx2.AsyncBaseTransport | None = None,
        jwks_refresh_cooldown: dt.timedelta = JWKS_REFRESH_COOLDOWN,
    ) -> None:
        self._http = httpx2.AsyncClient(
            transport=transport,
            timeout=HTTP_TIMEOUT_SECONDS,
            follow_redirects=False,
            headers={"User-Agent": "soko-oidc"},
        )
        self._providers = {
            name: OidcProvider(
                config,
                http=self._http,
                clock=clock,
                jwks_refresh_cooldown=jwks_refresh_cooldown,
            )
            for name, config in configs.items()
        }

    @classmethod
    def from_config(
        cls,
        raw: Mapping[str, Any] | str,
        *,
        clock: Clock,
        allow_http: bool = False,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> OidcProviders:
        return cls(
            parse_oidc_providers(raw, allow_http=allow_http), clock=clock, transport=transport
        )

    def names(self) -> list[str]:
        return sorted(self._providers)

    def get(self, name: str) -> OidcProvider:
        try:
            return self._providers[name]
        except KeyError:
            raise UnknownOidcProvider(name) from None

    async def aclose(self) -> None:
        await self._http.aclose()


# -- the server-side half of a started sign-in ----------------------------------------


def _authorization_key(state: str) -> str:
    # The state is a bearer secret for the flow; the cache only ever sees its hash.
    return "oidc:authorization:" + hashlib.sha256(state.encode()).hexdigest()


async def remember_authorization(cache: Cache, authorization: OidcAuthorization) -> None:
    """Keep a started sign-in's secrets until its callback, for :data:`AUTHORIZATION_TTL`."""
    await cache.set(
        _authorization_key(authorization.state),
        {
            "provider": authorization.provider,
            "url": authorization.url,
            "nonce": authorization.nonce,
            "code_verifier": authorization.code_verifier,
            "redirect_uri": authorization.redirect_uri,
            "expires_at": authorization.expires_at.isoformat(),
        },
        ttl=AUTHORIZATION_TTL.total_seconds(),
    )


async def take_authorization(
    cache: Cache, state: str, *, provider: str, clock: Clock
) -> OidcAuthorization:
    """The sign-in ``state`` started, removed so it cannot finish twice.

    Raises :class:`OidcError` (``unknown_state``) for a state that is unknown, expired,
    already used, or started with another provider. The read and the delete are two
    steps, so two callbacks racing with one state could both read it; the provider's
    authorization code is single use, so at most one of them gets an ID token.
    """
    if not state or len(state) > 512:
        raise OidcError(OidcRejection.unknown_state)
    key = _authorization_key(state)
    stored = await cache.get(key)
    if not isinstance(stored, dict):
        raise OidcError(OidcRejection.unknown_state)
    await cache.delete(key)
    expires_at = dt.datetime.fromisoformat(stored["expires_at"])
    if stored["provider"] != provider or clock.now() >= expires_at:
        raise OidcError(OidcRejection.unknown_state)
    return OidcAuthorization(
        provider=stored["provider"],
        url=stored["url"],
        state=state,
        nonce=stored["nonce"],
        code_verifier=stored["code_verifier"],
        redirect_uri=stored["redirect_uri"],
        expires_at=expires_at,
    )
