"""Social sign-in through OpenID Connect, against a provider the tests run in-process."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey
from sqlalchemy import select, update

from soko.identity.accounts import create_user, normalize_email
from soko.identity.login_methods import change_login_settings
from soko.identity.models import AuditEvent, AuthSession, ExternalIdentity, User, UserStatus
from soko.identity.oidc import (
    APPLE_ISSUER,
    AUTHORIZATION_TTL,
    DISCOVERY_TTL,
    OidcError,
    OidcIdentity,
    OidcProviders,
    OidcProviderUnavailable,
    OidcRejection,
    UnknownOidcProvider,
    email_is_verified,
    parse_oidc_providers,
    pkce_challenge,
    remember_authorization,
    take_authorization,
)
from soko.identity.routes_oidc import oidc_providers
from soko.platform.cache import MemoryCache, RedisCache
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.identity.mfa_support import VERIFY, audit_actions, code_now, enable_mfa, make_holder
from tests.identity.oidc_provider import LocalOidcProvider, RegisteredClient

ISSUER = "http://oidc.test"
REDIRECT_URI = "https://market.soko.test/auth/callback"
CLIENT_ID = "soko-web"
CLIENT_SECRET = "local-client-secret"

APPLE_CLIENT_ID = "test.soko.market"
APPLE_TEAM_ID = "TEAM123456"
APPLE_KEY_ID = "KEY7654321"


def _p256_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def provider(clock: ManualClock) -> LocalOidcProvider:
    local = LocalOidcProvider(issuer=ISSUER, clock=clock)
    local.register(RegisteredClient(CLIENT_ID, (REDIRECT_URI,), secret=CLIENT_SECRET))
    return local


def _local_config(**overrides: Any) -> dict[str, Any]:
    return {
        "issuer": ISSUER,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [REDIRECT_URI],
        **overrides,
    }


@pytest.fixture
async def providers(
    provider: LocalOidcProvider, clock: ManualClock
) -> AsyncIterator[OidcProviders]:
    registry = OidcProviders.from_config(
        {"local": _local_config()},
        clock=clock,
        allow_http=True,
        transport=httpx2.ASGITransport(app=provider.app),
    )
    yield registry
    await registry.aclose()


async def _authorize(provider: LocalOidcProvider, url: str) -> dict[str, str]:
    """Play the browser: follow the authorization URL and read where it sends us back."""
    transport = httpx2.ASGITransport(app=provider.app)
    async with httpx2.AsyncClient(transport=transport) as browser:
        response = await browser.get(url)
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT_URI
    return {key: values[0] for key, values in parse_qs(location.query).items()}


async def _sign_in(
    providers: OidcProviders, provider: LocalOidcProvider, name: str = "local"
) -> OidcIdentity:
    adapter = providers.get(name)
    authorization = await adapter.authorization()
    answer = await _authorize(provider, authorization.url)
    assert answer["state"] == authorization.state
    return await adapter.sign_in(answer["code"], authorization)


async def _refused(
    providers: OidcProviders, provider: LocalOidcProvider, reason: OidcRejection
) -> OidcError:
    with pytest.raises(OidcError) as caught:
        await _sign_in(providers, provider)
    assert caught.value.reason is reason, caught.value
    return caught.value


# -- the happy path -------------------------------------------------------------------


async def test_sign_in_returns_the_verified_identity(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    identity = await _sign_in(providers, provider)

    assert identity == OidcIdentity(
        provider="local",
        subject="user-1234",
        email="amina@example.org",
        email_verified=True,
        name="Amina Njeri",
    )
    assert provider.token_requests == 1
    assert provider.client_secrets_seen == [CLIENT_SECRET]


async def test_authorization_url_carries_state_nonce_and_pkce_s256(
    providers: OidcProviders,
) -> None:
    authorization = await providers.get("local").authorization()

    url = urlsplit(authorization.url)
    params = {key: values[0] for key, values in parse_qs(url.query).items()}
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{ISSUER}/authorize"
    assert params == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid email profile",
        "state": authorization.state,
        "nonce": authorization.nonce,
        "code_challenge": pkce_challenge(authorization.code_verifier or ""),
        "code_challenge_method": "S256",
    }
    assert len(authorization.state) >= 43 and len(authorization.nonce) >= 43
    assert 43 <= len(authorization.code_verifier or "") <= 128
    other = await providers.get("local").authorization()
    assert {other.state, other.nonce}.isdisjoint({authorization.state, authorization.nonce})


def test_pkce_challenge_matches_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


async def test_sign_in_with_an_es256_id_token(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.signing_alg = "ES256"
    identity = await _sign_in(providers, provider)
    assert identity.subject == "user-1234"


async def test_wrong_pkce_verifier_is_refused_by_the_provider(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    adapter = providers.get("local")
    authorization = await adapter.authorization()
    answer = await _authorize(provider, authorization.url)
    with pytest.raises(OidcError) as caught:
        await adapter.exchange_code(
            answer["code"], redirect_uri=REDIRECT_URI, code_verifier="x" * 64
        )
    assert caught.value.reason is OidcRejection.token_refused


async def test_a_code_cannot_be_exchanged_twice(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    adapter = providers.get("local")
    authorization = await adapter.authorization()
    answer = await _authorize(provider, authorization.url)
    await adapter.sign_in(answer["code"], authorization)
    with pytest.raises(OidcError) as caught:
        await adapter.sign_in(answer["code"], authorization)
    assert caught.value.reason is OidcRejection.token_refused


async def test_redirect_uri_must_be_configured(providers: OidcProviders) -> None:
    with pytest.raises(OidcError) as caught:
        await providers.get("local").authorization("https://evil.test/callback")
    assert caught.value.reason is OidcRejection.bad_redirect_uri


async def test_client_secret_basic_authentication(
    provider: LocalOidcProvider, clock: ManualClock
) -> None:
    registry = OidcProviders.from_config(
        {"local": _local_config(token_endpoint_auth_method="client_secret_basic")},
        clock=clock,
        allow_http=True,
        transport=httpx2.ASGITransport(app=provider.app),
    )
    try:
        assert (await _sign_in(registry, provider)).subject == "user-1234"
    finally:
        await registry.aclose()


def test_unknown_provider_is_a_lookup_error(providers: OidcProviders) -> None:
    assert providers.names() == ["local"]
    with pytest.raises(UnknownOidcProvider):
        providers.get("myspace")


# -- forged and wrong ID tokens -------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_token_signed_by_another_key_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider, alg: Any
) -> None:
    provider.signing_alg = alg
    provider.forgery = "foreign-key"
    await _refused(providers, provider, OidcRejection.bad_signature)


async def test_alg_none_is_refused(providers: OidcProviders, provider: LocalOidcProvider) -> None:
    provider.forgery = "none"
    await _refused(providers, provider, OidcRejection.unsupported_algorithm)


async def test_hs256_keyed_with_the_public_key_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.forgery = "hs256-public-key"
    await _refused(providers, provider, OidcRejection.unsupported_algorithm)


async def test_token_naming_its_own_key_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.header_overrides = {"jku": "https://evil.test/jwks"}
    await _refused(providers, provider, OidcRejection.refused_header)


async def test_es256_header_on_an_rsa_kid_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    # The token says ES256 but names the RSA key: no key of that type has that kid.
    provider.signing_alg = "ES256"
    provider.header_overrides = {"kid": provider.rsa_key.kid}
    await _refused(providers, provider, OidcRejection.unknown_key)


async def test_wrong_audience_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.claim_overrides = {"aud": "someone-else"}
    error = await _refused(providers, provider, OidcRejection.invalid_claim)
    assert error.detail == "aud"


async def test_extra_audience_without_azp_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.claim_overrides = {"aud": [CLIENT_ID, "someone-else"]}
    error = await _refused(providers, provider, OidcRejection.missing_claim)
    assert error.detail == "azp"


async def test_wrong_issuer_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.claim_overrides = {"iss": "https://accounts.evil.test"}
    error = await _refused(providers, provider, OidcRejection.invalid_claim)
    assert error.detail == "iss"


async def test_issuer_alias_is_accepted_when_configured(
    provider: LocalOidcProvider, clock: ManualClock
) -> None:
    provider.claim_overrides = {"iss": "oidc.test"}
    registry = OidcProviders.from_config(
        {"local": _local_config(issuer_aliases=["oidc.test"])},
        clock=clock,
        allow_http=True,
        transport=httpx2.ASGITransport(app=provider.app),
    )
    try:
        assert (await _sign_in(registry, provider)).subject == "user-1234"
    finally:
        await registry.aclose()


async def test_expired_token_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider, clock: ManualClock
) -> None:
    now = int(clock.now().timestamp())
    provider.claim_overrides = {"iat": now - 700, "exp": now - 61}  # beyond the 60 s leeway
    await _refused(providers, provider, OidcRejection.expired)


async def test_expiry_within_the_leeway_is_accepted(
    providers: OidcProviders, provider: LocalOidcProvider, clock: ManualClock
) -> None:
    now = int(clock.now().timestamp())
    provider.claim_overrides = {"iat": now - 700, "exp": now - 30}
    assert (await _sign_in(providers, provider)).subject == "user-1234"


async def test_token_issued_in_the_future_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider, clock: ManualClock
) -> None:
    now = int(clock.now().timestamp())
    provider.claim_overrides = {"iat": now + 300, "exp": now + 900}
    error = await _refused(providers, provider, OidcRejection.invalid_claim)
    assert error.detail == "iat"


async def test_wrong_nonce_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.claim_overrides = {"nonce": "replayed-nonce"}
    error = await _refused(providers, provider, OidcRejection.invalid_claim)
    assert error.detail == "nonce"


async def test_missing_nonce_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.claim_overrides = {"nonce": None}
    error = await _refused(providers, provider, OidcRejection.missing_claim)
    assert error.detail == "nonce"


async def test_wrong_at_hash_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.claim_overrides = {"at_hash": "AAAAAAAAAAAAAAAAAAAAAA"}
    error = await _refused(providers, provider, OidcRejection.invalid_claim)
    assert error.detail == "at_hash"


@pytest.mark.parametrize("claim", ["sub", "exp", "iat"])
async def test_missing_required_claim_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider, claim: str
) -> None:
    provider.claim_overrides = {claim: None}
    error = await _refused(providers, provider, OidcRejection.missing_claim)
    assert claim in error.detail


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b", "a.b.c.d.e", "é.é.é"])
async def test_malformed_id_token_is_refused(providers: OidcProviders, token: str) -> None:
    with pytest.raises(OidcError) as caught:
        await providers.get("local").verify_id_token(token, nonce="n")
    assert caught.value.reason is OidcRejection.malformed


# -- keys: caching, rotation ----------------------------------------------------------


async def test_discovery_and_jwks_are_cached(
    providers: OidcProviders, provider: LocalOidcProvider, clock: ManualClock
) -> None:
    await _sign_in(providers, provider)
    await _sign_in(providers, provider)
    assert (provider.discovery_requests, provider.jwks_requests) == (1, 1)

    clock.advance(DISCOVERY_TTL)
    await _sign_in(providers, provider)
    assert (provider.discovery_requests, provider.jwks_requests) == (2, 2)


async def test_unknown_kid_refreshes_the_jwks_once_after_a_rotation(
    providers: OidcProviders, provider: LocalOidcProvider, clock: ManualClock
) -> None:
    await _sign_in(providers, provider)
    assert provider.jwks_requests == 1
    clock.advance(60)
    provider.rotate_keys()

    identity = await _sign_in(providers, provider)

    assert identity.subject == "user-1234"
    assert provider.jwks_requests == 2
    await _sign_in(providers, provider)
    assert provider.jwks_requests == 2


async def test_kid_still_unknown_after_the_refresh_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider, clock: ManualClock
) -> None:
    await _sign_in(providers, provider)
    clock.advance(60)
    provider.forgery = "unpublished-kid"

    await _refused(providers, provider, OidcRejection.unknown_key)

    assert provider.jwks_requests == 2


async def test_unknown_kid_does_not_refetch_within_the_cooldown(
    providers: OidcProviders, provider: LocalOidcProvider, clock: ManualClock
) -> None:
    await _sign_in(providers, provider)
    provider.forgery = "unpublished-kid"
    for _ in range(3):
        await _refused(providers, provider, OidcRejection.unknown_key)
    assert provider.jwks_requests == 1


async def test_discovery_naming_another_issuer_is_refused(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.discovery_overrides = {"issuer": "https://accounts.evil.test"}
    with pytest.raises(OidcError) as caught:
        await providers.get("local").authorization()
    assert caught.value.reason is OidcRejection.bad_discovery


async def test_discovery_with_plain_http_endpoints_is_refused_for_an_https_issuer(
    clock: ManualClock,
) -> None:
    local = LocalOidcProvider(issuer="https://oidc.test", clock=clock)
    local.discovery_overrides = {"token_endpoint": "http://oidc.test/token"}
    registry = OidcProviders.from_config(
        {"local": _local_config(issuer="https://oidc.test")},
        clock=clock,
        transport=httpx2.ASGITransport(app=local.app),
    )
    try:
        with pytest.raises(OidcError) as caught:
            await registry.get("local").authorization()
        assert caught.value.reason is OidcRejection.bad_discovery
    finally:
        await registry.aclose()


async def test_unreachable_provider_is_unavailable(clock: ManualClock) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    registry = OidcProviders.from_config(
        {"local": _local_config()},
        clock=clock,
        allow_http=True,
        transport=httpx2.MockTransport(refuse),
    )
    try:
        with pytest.raises(OidcProviderUnavailable):
            await registry.get("local").authorization()
    finally:
        await registry.aclose()


async def test_provider_server_error_is_unavailable(clock: ManualClock) -> None:
    registry = OidcProviders.from_config(
        {"local": _local_config()},
        clock=clock,
        allow_http=True,
        transport=httpx2.MockTransport(lambda request: httpx2.Response(503)),
    )
    try:
        with pytest.raises(OidcProviderUnavailable):
            await registry.get("local").authorization()
    finally:
        await registry.aclose()


# -- email_verified -------------------------------------------------------------------


async def test_unverified_email_is_flagged(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.user.email_verified = False
    identity = await _sign_in(providers, provider)
    assert identity.email == "amina@example.org"
    assert identity.email_verified is False


async def test_email_without_email_verified_counts_as_unverified(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.user.email_verified = None
    identity = await _sign_in(providers, provider)
    assert identity.email_verified is False


async def test_no_email_is_never_verified(
    providers: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.user.email = None
    provider.user.name = None
    provider.claim_overrides = {"given_name": "Amina", "family_name": "Njeri"}
    identity = await _sign_in(providers, provider)
    assert (identity.email, identity.email_verified, identity.name) == (None, False, "Amina Njeri")


@pytest.mark.parametrize(
    ("value", "verified"),
    [
        (True, True),
        ("true", True),
        ("TRUE", True),
        (False, False),
        ("false", False),
        ("yes", False),
        (1, False),
        (None, False),
    ],
)
def test_email_verified_reading(value: Any, verified: bool) -> None:
    assert email_is_verified(value) is verified


# -- Apple ----------------------------------------------------------------------------


@pytest.fixture
def apple_team_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def apple(clock: ManualClock, apple_team_key: ec.EllipticCurvePrivateKey) -> LocalOidcProvider:
    local = LocalOidcProvider(issuer=APPLE_ISSUER, clock=clock)
    local.register(
        RegisteredClient(
            APPLE_CLIENT_ID,
            (REDIRECT_URI,),
            team_id=APPLE_TEAM_ID,
            team_key=ECKey.import_key(apple_team_key.public_key()),
        )
    )
    local.user.email = "abc123@privaterelay.appleid.com"
    local.user.email_verified = "true"  # Apple's string
    local.user.name = None  # Apple never puts the name in the ID token
    return local


@pytest.fixture
async def apple_providers(
    apple: LocalOidcProvider, clock: ManualClock, apple_team_key: ec.EllipticCurvePrivateKey
) -> AsyncIterator[OidcProviders]:
    registry = OidcProviders.from_config(
        {
            "apple": {
                "issuer": APPLE_ISSUER,
                "client_id": APPLE_CLIENT_ID,
                "client_secret_jwt_key": _p256_pem(apple_team_key),
                "team_id": APPLE_TEAM_ID,
                "key_id": APPLE_KEY_ID,
                "redirect_uris": [REDIRECT_URI],
                "scopes": ["openid", "email", "name"],
                "authorize_params": {"response_mode": "form_post"},
            }
        },
        clock=clock,
        transport=httpx2.ASGITransport(app=apple.app),
    )
    yield registry
    await registry.aclose()


async def test_apple_sign_in_with_string_email_verified(
    apple_providers: OidcProviders, apple: LocalOidcProvider
) -> None:
    identity = await _sign_in(apple_providers, apple, "apple")
    assert identity == OidcIdentity(
        provider="apple",
        subject="user-1234",
        email="abc123@privaterelay.appleid.com",
        email_verified=True,
        name=None,
    )
    # The provider accepted the minted client secret: it verified the signature and claims.
    assert len(apple.client_secrets_seen) == 1


async def test_apple_string_false_is_unverified(
    apple_providers: OidcProviders, apple: LocalOidcProvider
) -> None:
    apple.user.email_verified = "false"
    assert (await _sign_in(apple_providers, apple, "apple")).email_verified is False


async def test_apple_authorization_url_asks_for_form_post(apple_providers: OidcProviders) -> None:
    authorization = await apple_providers.get("apple").authorization()
    params = parse_qs(urlsplit(authorization.url).query)
    assert params["response_mode"] == ["form_post"]
    assert params["scope"] == ["openid email name"]


def test_apple_client_secret_is_an_es256_jwt_with_apple_claims(
    apple_providers: OidcProviders,
    apple_team_key: ec.EllipticCurvePrivateKey,
    clock: ManualClock,
) -> None:
    secret = apple_providers.get("apple").client_secret()

    token = jwt.decode(secret, ECKey.import_key(apple_team_key.public_key()), algorithms=["ES256"])
    now = int(clock.now().timestamp())
    assert token.header == {"alg": "ES256", "kid": APPLE_KEY_ID, "typ": "JWT"}
    assert token.claims == {
        "iss": APPLE_TEAM_ID,
        "sub": APPLE_CLIENT_ID,
        "aud": "https://appleid.apple.com",
        "iat": now,
        "exp": now + 300,
    }


async def test_apple_refuses_a_client_secret_signed_by_another_team_key(
    apple_providers: OidcProviders, apple: LocalOidcProvider
) -> None:
    apple.clients[APPLE_CLIENT_ID].team_key = ECKey.generate_key("P-256")
    with pytest.raises(OidcError) as caught:
        await _sign_in(apple_providers, apple, "apple")
    assert caught.value.reason is OidcRejection.token_refused


# -- configuration --------------------------------------------------------------------


def test_google_and_apple_configurations_parse(
    apple_team_key: ec.EllipticCurvePrivateKey,
) -> None:
    providers = parse_oidc_providers(
        {
            "google": {
                "issuer": "https://accounts.google.com",
                "issuer_aliases": ["accounts.google.com"],
                "client_id": "1234.apps.googleusercontent.com",
                "client_secret": "google-secret",
                "redirect_uris": ["https://market.example/auth/google"],
            },
            "apple": {
                "issuer": APPLE_ISSUER,
                "client_id": APPLE_CLIENT_ID,
                "client_secret_jwt_key": _p256_pem(apple_team_key),
                "team_id": APPLE_TEAM_ID,
                "key_id": APPLE_KEY_ID,
                "redirect_uris": ["https://market.example/auth/apple"],
                "authorize_params": {"response_mode": "form_post"},
            },
        }
    )
    assert sorted(providers) == ["apple", "google"]
    assert providers["google"].scopes == ("openid", "email", "profile")
    assert providers["apple"].mints_client_secret
    assert "google-secret" not in repr(providers["google"])
    assert parse_oidc_providers("") == {}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"client_secret": None}, "client_secret (or client_secret_jwt_key) is required"),
        ({"issuer": "http://oidc.example"}, "issuer must use https"),
        ({"issuer": "https://oidc.example?x=1"}, "issuer may not carry a query"),
        ({"redirect_uris": ["http://market.example/cb"]}, "must use https"),
        ({"redirect_uris": []}, "redirect_uris"),
        ({"scopes": ["email"]}, "must include 'openid'"),
        ({"authorize_params": {"state": "fixed"}}, "may not set state"),
        ({"team_id": "T"}, "go together"),
        ({"colour": "blue"}, "colour"),
        ({"leeway_seconds": 3600}, "leeway_seconds"),
    ],
)
def test_bad_configurations_are_refused(config: dict[str, Any], message: str) -> None:
    values = {
        "issuer": "https://oidc.example",
        "client_id": "client",
        "client_secret": "secret",
        "redirect_uris": ["https://market.example/cb"],
    }
    values.update(config)
    values = {key: value for key, value in values.items() if value is not None}
    with pytest.raises(ValueError, match=r"^local") as caught:
        parse_oidc_providers({"local": values})
    assert message in str(caught.value)


def test_loopback_http_redirect_is_allowed_for_native_apps() -> None:
    providers = parse_oidc_providers(
        {
            "local": {
                "issuer": "https://oidc.example",
                "client_id": "client",
                "client_secret": "secret",
                "redirect_uris": ["http://127.0.0.1:8765/cb", "com.soko.market:/oauth2"],
            }
        }
    )
    assert providers["local"].redirect_uris[1] == "com.soko.market:/oauth2"


def test_apple_key_must_be_p256() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        parse_oidc_providers(
            {
                "apple": {
                    "issuer": APPLE_ISSUER,
                    "client_id": APPLE_CLIENT_ID,
                    "client_secret_jwt_key": _p256_pem(key),
                    "team_id": APPLE_TEAM_ID,
                    "key_id": APPLE_KEY_ID,
                    "redirect_uris": [REDIRECT_URI],
                }
            }
        )


def test_provider_names_are_checked() -> None:
    with pytest.raises(ValueError, match="lowercase"):
        parse_oidc_providers({"Google!": {}})


# -- the server-side half of a flow ---------------------------------------------------


async def _flow_round_trip(cache: Any, providers: OidcProviders, clock: ManualClock) -> None:
    authorization = await providers.get("local").authorization()
    await remember_authorization(cache, authorization)

    with pytest.raises(OidcError):
        await take_authorization(cache, authorization.state, provider="apple", clock=clock)
    # A state presented with the wrong provider is burnt, like any used state.
    with pytest.raises(OidcError):
        await take_authorization(cache, authorization.state, provider="local", clock=clock)

    authorization = await providers.get("local").authorization()
    await remember_authorization(cache, authorization)
    taken = await take_authorization(cache, authorization.state, provider="local", clock=clock)
    assert taken == authorization
    with pytest.raises(OidcError) as caught:
        await take_authorization(cache, authorization.state, provider="local", clock=clock)
    assert caught.value.reason is OidcRejection.unknown_state


async def test_flow_state_is_single_use_in_memory(
    providers: OidcProviders, clock: ManualClock
) -> None:
    await _flow_round_trip(MemoryCache(clock=clock), providers, clock)


async def test_flow_state_is_single_use_in_redis(
    providers: OidcProviders, clock: ManualClock, redis_url: str, redis_namespace: str
) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        cache = RedisCache(redis, namespace=redis_namespace)
        await _flow_round_trip(cache, providers, clock)
        authorization = await providers.get("local").authorization()
        await remember_authorization(cache, authorization)
        keys = [key async for key in redis.scan_iter(match=f"{redis_namespace}*")]
        assert keys and all(authorization.state.encode() not in key for key in keys)
        ttl = await redis.pttl(keys[0])
        assert 0 < ttl <= AUTHORIZATION_TTL.total_seconds() * 1000
    finally:
        await redis.aclose()


async def test_flow_state_expires_after_ten_minutes(
    providers: OidcProviders, clock: ManualClock
) -> None:
    cache = MemoryCache(clock=clock)
    authorization = await providers.get("local").authorization()
    await remember_authorization(cache, authorization)
    clock.advance(AUTHORIZATION_TTL + dt.timedelta(seconds=1))
    with pytest.raises(OidcError):
        await take_authorization(cache, authorization.state, provider="local", clock=clock)


async def test_unknown_state_is_refused(clock: ManualClock) -> None:
    cache = MemoryCache(clock=clock)
    for state in ["", "made-up", "x" * 600]:
        with pytest.raises(OidcError):
            await take_authorization(cache, state, provider="local", clock=clock)


# -- the routes: start, callback, linking ---------------------------------------------

START = "/api/v1/auth/oidc/local/start"
CALLBACK = "/api/v1/auth/oidc/local/callback"


@pytest.fixture
async def oidc_app(
    app: Any, runtime: Runtime, provider: LocalOidcProvider
) -> AsyncIterator[OidcProviders]:
    """The app signing in through the local provider, with ``oidc:local`` switched on."""
    registry = OidcProviders.from_config(
        {"local": _local_config()},
        clock=runtime.clock,
        allow_http=True,
        transport=httpx2.ASGITransport(app=provider.app),
    )
    app.dependency_overrides[oidc_providers] = lambda: registry
    async with runtime.db.transaction() as session:
        await change_login_settings(
            session, methods={"oidc:local": True}, now=runtime.clock.now(), changed_by=None
        )
    yield registry
    app.dependency_overrides.pop(oidc_providers, None)
    await registry.aclose()


async def _route_sign_in(
    client: httpx2.AsyncClient, provider: LocalOidcProvider, **extra: Any
) -> httpx2.Response:
    started = await client.get(START)
    assert started.status_code == 200, started.text
    assert started.headers["cache-control"] == "no-store"
    answer = await _authorize(provider, started.json()["authorization_url"])
    assert answer["state"] == started.json()["state"]
    return await client.post(
        CALLBACK, json={"code": answer["code"], "state": answer["state"], **extra}
    )


async def _user(runtime: Runtime, user_id: str) -> User:
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, uuid.UUID(user_id))
        assert user is not None
        return user


async def _links(runtime: Runtime) -> list[tuple[uuid.UUID, str, str]]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(
                ExternalIdentity.user_id, ExternalIdentity.provider, ExternalIdentity.subject
            ).order_by(ExternalIdentity.created_at)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def _session_methods(runtime: Runtime, user_id: str) -> list[str]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.scalars(
            select(AuthSession.method).where(AuthSession.user_id == uuid.UUID(user_id))
        )
        return list(rows)


async def _existing_user(runtime: Runtime, email: str, *, verified: bool) -> uuid.UUID:
    async with runtime.db.transaction() as session:
        user = await create_user(
            session,
            runtime.data_keys,
            now=runtime.clock.now(),
            email=normalize_email(email),
            display_name="Amina (password)",
            email_verified=verified,
        )
        return user.id


async def test_route_sign_in_creates_an_account_with_the_verified_email(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    answer = await _route_sign_in(client, provider)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer" and body["refresh_token"]
    me = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200, me.text
    assert me.json()["email"] == "amina@example.org"
    assert me.json()["email_verified"] is True
    assert me.json()["display_name"] == "Amina Njeri"
    assert await _links(runtime) == [(uuid.UUID(body["user_id"]), "local", "user-1234")]
    assert await _session_methods(runtime, body["user_id"]) == ["oidc:local"]
    refreshed = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": body["refresh_token"]}
    )
    assert refreshed.status_code == 200, refreshed.text


async def test_route_second_sign_in_follows_the_link_not_the_email(
    client: httpx2.AsyncClient, oidc_app: OidcProviders, provider: LocalOidcProvider
) -> None:
    first = (await _route_sign_in(client, provider)).json()
    provider.user.email = "amina.new@example.org"

    second = await _route_sign_in(client, provider)

    assert second.status_code == 200, second.text
    assert second.json()["user_id"] == first["user_id"]
    assert second.json()["session_id"] != first["session_id"]


async def test_route_verified_email_links_the_existing_account(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    existing = await _existing_user(runtime, "Amina@Example.org", verified=True)

    answer = await _route_sign_in(client, provider)

    assert answer.status_code == 200, answer.text
    assert answer.json()["user_id"] == str(existing)
    assert await _links(runtime) == [(existing, "local", "user-1234")]
    actions = [action for action, _ in await audit_actions(runtime, existing)]
    assert "auth.oidc_linked" in actions and actions[-1] == "auth.login"


async def test_route_unverified_email_never_links_and_is_not_kept(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    existing = await _existing_user(runtime, "amina@example.org", verified=True)
    provider.user.email_verified = False

    answer = await _route_sign_in(client, provider)

    assert answer.status_code == 200, answer.text
    created = answer.json()["user_id"]
    assert created != str(existing)
    user = await _user(runtime, created)
    assert (user.email_ciphertext, user.email_index, user.email_verified_at) == (None, None, None)
    assert await _links(runtime) == [(uuid.UUID(created), "local", "user-1234")]


async def test_route_apple_style_string_true_links_like_a_boolean(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    existing = await _existing_user(runtime, "amina@example.org", verified=True)
    provider.user.email_verified = "true"
    answer = await _route_sign_in(client, provider)
    assert answer.json()["user_id"] == str(existing)


async def test_route_refuses_to_link_an_account_whose_email_is_unverified(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    # Someone registered the address without proving it: linking would hand the owner's
    # provider sign-in to whoever knows that account's password.
    await _existing_user(runtime, "amina@example.org", verified=False)

    answer = await _route_sign_in(client, provider)

    assert answer.status_code == 400
    assert answer.json()["type"] == "/problems/oidc-failed"
    assert await _links(runtime) == []


async def test_route_refuses_a_second_provider_user_with_the_same_email(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    first = (await _route_sign_in(client, provider)).json()
    provider.user.subject = "user-recycled-address"

    answer = await _route_sign_in(client, provider)

    assert answer.status_code == 400
    assert answer.json()["type"] == "/problems/oidc-failed"
    assert await _links(runtime) == [(uuid.UUID(first["user_id"]), "local", "user-1234")]


async def test_route_new_account_takes_the_app_supplied_name_when_the_token_has_none(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    provider.user.name = None
    answer = await _route_sign_in(client, provider, display_name="Amina N.")
    assert (await _user(runtime, answer.json()["user_id"])).display_name == "Amina N."


async def test_route_state_is_single_use(
    client: httpx2.AsyncClient, oidc_app: OidcProviders, provider: LocalOidcProvider
) -> None:
    started = (await client.get(START)).json()
    answer = await _authorize(provider, started["authorization_url"])
    first = await client.post(CALLBACK, json={"code": answer["code"], "state": answer["state"]})
    assert first.status_code == 200, first.text

    again = await client.post(CALLBACK, json={"code": answer["code"], "state": answer["state"]})

    assert again.status_code == 400
    assert again.json()["type"] == "/problems/oidc-failed"


async def test_route_made_up_state_is_refused_and_audited(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    answer = await client.post(CALLBACK, json={"code": "abc", "state": "made-up"})

    assert answer.status_code == 400
    assert answer.json()["type"] == "/problems/oidc-failed"
    assert provider.token_requests == 0
    async with runtime.db.transaction(read_only=True) as session:
        events = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.action == "auth.login_failed")
            )
        ).all()
    assert [event.data for event in events] == [{"method": "oidc:local", "reason": "unknown_state"}]


async def test_route_forged_id_token_is_refused(
    client: httpx2.AsyncClient, oidc_app: OidcProviders, provider: LocalOidcProvider
) -> None:
    provider.forgery = "foreign-key"
    answer = await _route_sign_in(client, provider)
    assert answer.status_code == 400
    assert answer.json()["type"] == "/problems/oidc-failed"
    assert "signature" not in answer.text  # the reason is logged and audited, not told


async def test_route_blocked_account_is_refused(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    first = (await _route_sign_in(client, provider)).json()
    async with runtime.db.transaction() as session:
        await session.execute(
            update(User)
            .where(User.id == uuid.UUID(first["user_id"]))
            .values(status=UserStatus.blocked.value)
        )

    answer = await _route_sign_in(client, provider)

    assert answer.status_code == 403
    assert answer.json()["type"] == "/problems/account-blocked"


async def test_route_account_with_mfa_gets_a_challenge(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    holder = await enable_mfa(
        client, runtime, await make_holder(runtime, email="amina@example.org")
    )

    answer = await _route_sign_in(client, provider)

    assert answer.status_code == 200, answer.text
    assert answer.json()["mfa_required"] is True
    assert "access_token" not in answer.json()
    verified = await client.post(
        VERIFY,
        json={
            "challenge_token": answer.json()["challenge_token"],
            "code": code_now(runtime, holder),
        },
    )
    assert verified.status_code == 200, verified.text
    assert verified.json()["user_id"] == str(holder.user_id)
    assert "oidc:local" in await _session_methods(runtime, str(holder.user_id))


async def test_route_switched_off_provider_is_refused(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    started = (await client.get(START)).json()
    async with runtime.db.transaction() as session:
        await change_login_settings(
            session, methods={"oidc:local": False}, now=runtime.clock.now(), changed_by=None
        )

    assert (await client.get(START)).json()["type"] == "/problems/login-method-disabled"
    answer = await client.post(CALLBACK, json={"code": "abc", "state": started["state"]})
    assert answer.status_code == 403
    assert answer.json()["type"] == "/problems/login-method-disabled"


async def test_route_unknown_provider_is_not_found(
    client: httpx2.AsyncClient, oidc_app: OidcProviders
) -> None:
    answer = await client.get("/api/v1/auth/oidc/myspace/start")
    assert answer.status_code == 404
    assert answer.json()["type"] == "/problems/not-found"


async def test_route_state_of_another_provider_is_refused(
    client: httpx2.AsyncClient,
    oidc_app: OidcProviders,
    provider: LocalOidcProvider,
    runtime: Runtime,
) -> None:
    authorization = await oidc_app.get("local").authorization()
    await remember_authorization(
        runtime.cache, dataclasses.replace(authorization, provider="apple")
    )
    answer = await client.post(CALLBACK, json={"code": "abc", "state": authorization.state})
    assert answer.status_code == 400
    assert provider.token_requests == 0


async def test_route_redirect_uri_must_be_configured(
    client: httpx2.AsyncClient, oidc_app: OidcProviders
) -> None:
    answer = await client.get(START, params={"redirect_uri": "https://evil.test/cb"})
    assert answer.status_code == 422
    assert answer.json()["type"] == "/problems/validation-error"


async def test_route_unreachable_provider_is_503(
    client: httpx2.AsyncClient, app: Any, runtime: Runtime, oidc_app: OidcProviders
) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    down = OidcProviders.from_config(
        {"local": _local_config()},
        clock=runtime.clock,
        allow_http=True,
        transport=httpx2.MockTransport(refuse),
    )
    app.dependency_overrides[oidc_providers] = lambda: down
    try:
        answer = await client.get(START)
    finally:
        await down.aclose()
    assert answer.status_code == 503
    assert answer.json()["type"] == "/problems/service-unavailable"


async def test_configured_providers_come_from_settings(runtime: Runtime, app: Any) -> None:
    request = type("R", (), {"app": app})()
    registry = await oidc_providers(request)  # type: ignore[arg-type]
    try:
        assert await oidc_providers(request) is registry  # type: ignore[arg-type]
        expected = parse_oidc_providers(_raw_settings_value(runtime), allow_http=True)
        assert registry.names() == sorted(expected)
    finally:
        await registry.aclose()
        del app.state.oidc_providers


def _raw_settings_value(runtime: Runtime) -> str:
    raw = getattr(runtime.settings, "oidc_providers", "")
    return raw.get_secret_value() if hasattr(raw, "get_secret_value") else str(raw or "")
