"""A small but real OpenID Connect provider, run in-process by the tests.

It serves discovery, a JWKS (an RSA and an EC P-256 key generated at start), an
authorization endpoint that signs in :attr:`LocalOidcProvider.user` at once and
redirects back with a code, and a token endpoint that checks the client (a shared
secret, or Apple's ES256 client-secret JWT), the redirect URI and the PKCE verifier
before issuing an ID token. Reach it through ``httpx2.ASGITransport(app=provider.app)``.

Knobs let a test make it misbehave the ways a hostile or broken provider would: claim
overrides, a token signed with a key it does not publish, ``alg: none``, HS256 keyed
with its own public key, and key rotation.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from soko.platform.clock import Clock

Forgery = Literal["foreign-key", "none", "hs256-public-key", "unpublished-kid"]


@dataclasses.dataclass
class ProviderUser:
    subject: str = "user-1234"
    email: str | None = "amina@example.org"
    email_verified: Any = True  # bool, Apple's string "true", or None to leave it out
    name: str | None = "Amina Njeri"


@dataclasses.dataclass
class RegisteredClient:
    client_id: str
    redirect_uris: tuple[str, ...]
    secret: str | None = None
    # Apple style: the client authenticates with an ES256 JWT signed by its team key.
    team_id: str | None = None
    team_key: ECKey | None = None


@dataclasses.dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    nonce: str | None
    code_challenge: str | None
    used: bool = False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _half_hash(value: str) -> str:
    return _b64(hashlib.sha256(value.encode()).digest()[:16])


class LocalOidcProvider:
    def __init__(self, *, issuer: str = "http://oidc.test", clock: Clock) -> None:
        self.issuer = issuer
        self.clock = clock
        self.user = ProviderUser()
        self.clients: dict[str, RegisteredClient] = {}
        self.signing_alg: Literal["RS256", "ES256"] = "RS256"
        self.claim_overrides: dict[str, Any] = {}
        self.header_overrides: dict[str, Any] = {}
        self.forgery: Forgery | None = None
        self.discovery_overrides: dict[str, Any] = {}
        self.discovery_requests = 0
        self.jwks_requests = 0
        self.token_requests = 0
        self.client_secrets_seen: list[str] = []
        self.rsa_key, self.ec_key = self._new_keys()
        self._grants: dict[str, _Grant] = {}
        self.app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
            ]
        )

    # -- test controls ----------------------------------------------------------------

    def register(self, client: RegisteredClient) -> RegisteredClient:
        self.clients[client.client_id] = client
        return client

    def rotate_keys(self) -> None:
        """Publish new keys and drop the old ones, as a provider does after a rotation."""
        self.rsa_key, self.ec_key = self._new_keys()

    @staticmethod
    def _new_keys() -> tuple[RSAKey, ECKey]:
        rsa = RSAKey.generate_key(2048, auto_kid=True)
        ec = ECKey.generate_key("P-256", auto_kid=True)
        return rsa, ec

    def signing_key(self) -> Key:
        return self.rsa_key if self.signing_alg == "RS256" else self.ec_key

    # -- endpoints --------------------------------------------------------------------

    async def discovery(self, request: Request) -> Response:
        self.discovery_requests += 1
        document = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "client_secret_basic",
            ],
            **self.discovery_overrides,
        }
        return JSONResponse(document)

    async def jwks(self, request: Request) -> Response:
        self.jwks_requests += 1
        keys = [
            {**self.rsa_key.as_dict(private=False), "use": "sig", "alg": "RS256"},
            {**self.ec_key.as_dict(private=False), "use": "sig", "alg": "ES256"},
        ]
        return JSONResponse({"keys": keys})

    async def authorize(self, request: Request) -> Response:
        params = request.query_params
        client = self.clients.get(params.get("client_id", ""))
        redirect_uri = params.get("redirect_uri", "")
        if client is None or redirect_uri not in client.redirect_uris:
            # Never redirect to an unregistered URI (RFC 6749 section 4.1.2.1).
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        back: dict[str, str] = {}
        if params.get("state"):
            back["state"] = params["state"]
        scopes = params.get("scope", "").split()
        challenge = params.get("code_challenge")
        bad_challenge = challenge is not None and params.get("code_challenge_method") != "S256"
        if params.get("response_type") != "code" or "openid" not in scopes or bad_challenge:
            back["error"] = "invalid_request"
        else:
            code = secrets.token_urlsafe(24)
            self._grants[code] = _Grant(
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                nonce=params.get("nonce"),
                code_challenge=challenge,
            )
            back["code"] = code
        return RedirectResponse(_with_query(redirect_uri, back), status_code=302)

    async def token(self, request: Request) -> Response:
        self.token_requests += 1
        form = {key: values[0] for key, values in parse_qs((await request.body()).decode()).items()}
        client = self._authenticate(request, form)
        if client is None:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("grant_type") != "authorization_code":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        grant = self._grants.get(form.get("code", ""))
        if (
            grant is None
            or grant.used
            or grant.client_id != client.client_id
            or grant.redirect_uri != form.get("redirect_uri")
        ):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if grant.code_challenge is not None:
            verifier = form.get("code_verifier", "")
            if _b64(hashlib.sha256(verifier.encode()).digest()) != grant.code_challenge:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
        grant.used = True
        access_token = secrets.token_urlsafe(32)
        id_token = self.issue_id_token(client.client_id, grant.nonce, access_token)
        return JSONResponse(
            {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": 3600,
                "id_token": id_token,
            },
            headers={"Cache-Control": "no-store"},
        )

    def _authenticate(self, request: Request, form: dict[str, str]) -> RegisteredClient | None:
        client_id, secret = form.get("client_id"), form.get("client_secret")
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        client = self.clients.get(client_id or "")
        if client is None or not secret:
            return None
        self.client_secrets_seen.append(secret)
        if client.secret is not None:
            return client if hmac.compare_digest(client.secret, secret) else None
        assert client.team_key is not None
        try:
            token = jwt.decode(secret, client.team_key, algorithms=["ES256"])
            jwt.JWTClaimsRegistry(
                now=int(self.clock.now().timestamp()),
                iss={"essential": True, "value": client.team_id},
                sub={"essential": True, "value": client.client_id},
                aud={"essential": True, "value": self.issuer},
                exp={"essential": True},
                iat={"essential": True},
            ).validate(token.claims)
        except JoseError:
            return None
        return client

    # -- ID tokens --------------------------------------------------------------------

    def claims(self, client_id: str, nonce: str | None, access_token: str | None) -> dict[str, Any]:
        now = int(self.clock.now().timestamp())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.user.subject,
            "aud": client_id,
            "iat": now,
            "exp": now + 600,
            "auth_time": now,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        if access_token is not None:
            claims["at_hash"] = _half_hash(access_token)
        if self.user.email is not None:
            claims["email"] = self.user.email
        if self.user.email_verified is not None:
            claims["email_verified"] = self.user.email_verified
        if self.user.name is not None:
            claims["name"] = self.user.name
        for name, value in self.claim_overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def issue_id_token(self, client_id: str, nonce: str | None, access_token: str | None) -> str:
        claims = self.claims(client_id, nonce, access_token)
        key = self.signing_key()
        header: dict[str, Any] = {"alg": self.signing_alg, "kid": key.kid, "typ": "JWT"}
        header.update(self.header_overrides)
        if self.forgery == "none":
            return _unsigned({**header, "alg": "none"}, claims)
        if self.forgery == "hs256-public-key":
            # The classic key-confusion attack: HMAC keyed with the published RSA key.
            secret = self.rsa_key.as_pem(private=False)
            return _hmac_signed({**header, "alg": "HS256", "kid": self.rsa_key.kid}, claims, secret)
        if self.forgery == "foreign-key":
            # Another key claiming to be ours: same kid, same algorithm.
            key = _foreign_key(self.signing_alg)
        elif self.forgery == "unpublished-kid":
            key = _foreign_key(self.signing_alg)
            header["kid"] = key.kid
        return jwt.encode(header, claims, key, algorithms=[header["alg"]])

    def sign(self, claims: dict[str, Any], *, transform: Callable[[str], str] | None = None) -> str:
        """Sign arbitrary claims with the provider's current key (for direct tests)."""
        key = self.signing_key()
        token = jwt.encode({"alg": self.signing_alg, "kid": key.kid}, claims, key)
        return transform(token) if transform else token


def _foreign_key(alg: str) -> Key:
    if alg == "RS256":
        return RSAKey.generate_key(2048, auto_kid=True)
    return ECKey.generate_key("P-256", auto_kid=True)


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    encode = lambda part: _b64(json.dumps(part, separators=(",", ":")).encode())  # noqa: E731
    return f"{encode(header)}.{encode(claims)}"


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _segments(header, claims) + "."


def _hmac_signed(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = _segments(header, claims)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    return urlunsplit(parts._replace(query=query))
