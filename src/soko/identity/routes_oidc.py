"""Identity routes: social sign-in through OpenID Connect (mounted under /api/v1/auth/oidc).

``GET /{provider}/start`` answers the provider's authorization URL; the app sends the
user there, the provider sends them back to the app's redirect URI with ``code`` and
``state``, and the app posts both to ``POST /{provider}/callback``, which verifies the
ID token, links or creates the account (the rule is in :mod:`soko.identity.oidc`) and
answers the session's tokens, or an MFA challenge.

The state, nonce and PKCE verifier stay on the server, in the cache, for ten minutes.
The app must still compare the ``state`` it got back from the provider with the one
``start`` gave it before posting the callback: that comparison, done in the browser or
app that started the sign-in, is what stops someone from finishing their own sign-in in
another person's browser (login CSRF).
"""

from __future__ import annotations

import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity import login_methods, signin
from soko.identity.accounts import create_user, find_user_by_email, normalize_email
from soko.identity.audit import record_audit_event
from soko.identity.errors import AccountBlocked, LoginMethodDisabled, OidcFailed
from soko.identity.models import ExternalIdentity, Role, User, UserStatus
from soko.identity.oidc import (
    AUTHORIZATION_TTL,
    OidcError,
    OidcIdentity,
    OidcProvider,
    OidcProviders,
    OidcProviderUnavailable,
    OidcRejection,
    UnknownOidcProvider,
    remember_authorization,
    take_authorization,
)
from soko.identity.schemas import MfaChallengeOut, TokenPairOut
from soko.identity.sessions import TokenPair
from soko.platform.auth import Principal, public
from soko.platform.errors import (
    Conflict,
    NotFound,
    ServiceUnavailable,
    ValidationFailed,
    problem_responses,
)
from soko.platform.ids import uuid7
from soko.platform.ratelimit import rate_limit
from soko.platform.runtime import Runtime, RuntimeDep, SessionDep

log = structlog.get_logger("soko.identity.oidc")

router = APIRouter()

START_RATE = "30/minute"
CALLBACK_RATE = "10/minute;100/hour"

ProviderName = Annotated[str, Path(max_length=32, pattern=r"^[a-z][a-z0-9-]*$")]


async def oidc_providers(request: Request) -> OidcProviders:
    """The configured providers, built once per app from ``SOKO_OIDC_PROVIDERS``.

    Tests (and anything that must reach a provider another way) override this dependency.
    """
    state = request.app.state
    registry: OidcProviders | None = getattr(state, "oidc_providers", None)
    if registry is None:
        runtime: Runtime = state.runtime
        raw = getattr(runtime.settings, "oidc_providers", "")
        if isinstance(raw, SecretStr):
            raw = raw.get_secret_value()
        registry = OidcProviders.from_config(
            raw or "", clock=runtime.clock, allow_http=not runtime.settings.is_production
        )
        state.oidc_providers = registry
    return registry


ProvidersDep = Annotated[OidcProviders, Depends(oidc_providers)]


class OidcStartOut(BaseModel):
    authorization_url: str = Field(description="Send the user here")
    state: str = Field(
        description="Compare with the state the provider sends back before posting the callback"
    )
    expires_in: int = Field(description="Seconds left to finish the sign-in")


class OidcCallbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=2048)
    state: str = Field(min_length=1, max_length=512)
    display_name: str | None = Field(
        None,
        max_length=120,
        description=(
            "The name to give a new account when the provider's ID token has none (Apple "
            "hands the name to the app once, outside the token)"
        ),
    )


async def _enabled_provider(runtime: Runtime, providers: OidcProviders, name: str) -> OidcProvider:
    try:
        provider = providers.get(name)
    except UnknownOidcProvider:
        raise NotFound(f"No sign-in provider is called {name!r}.") from None
    async with runtime.db.transaction(read_only=True) as reader:
        enabled = await login_methods.login_method_enabled(reader, login_methods.oidc_method(name))
    if not enabled:
        raise LoginMethodDisabled(f"Signing in with {name} is switched off.")
    return provider


@router.get(
    "/{provider}/start",
    response_model=OidcStartOut,
    summary="Start signing in with a social provider",
    responses=problem_responses(403, 404, 422, 429, 503),
    dependencies=[Depends(rate_limit(START_RATE, scope="oidc-start"))],
)
async def start(
    provider: ProviderName,
    runtime: RuntimeDep,
    providers: ProvidersDep,
    response: Response,
    _caller: Annotated[Principal | None, public()],
    redirect_uri: Annotated[
        str | None,
        Query(max_length=2048, description="One of the provider's configured redirect URIs"),
    ] = None,
) -> OidcStartOut:
    """Answers the URL to send the user to, with a fresh state, nonce and PKCE (S256)
    challenge. Finish within ten minutes at ``POST /{provider}/callback``."""
    adapter = await _enabled_provider(runtime, providers, provider)
    try:
        authorization = await adapter.authorization(redirect_uri)
    except OidcError as exc:
        if exc.reason is OidcRejection.bad_redirect_uri:
            raise ValidationFailed(
                "redirect_uri is not one of this provider's redirect URIs",
                errors=[
                    {
                        "in": "query",
                        "field": "redirect_uri",
                        "detail": "is not a configured redirect URI",
                        "code": "value_error",
                    }
                ],
            ) from None
        log.warning("oidc_discovery_refused", provider=provider, reason=exc.reason.value)
        raise ServiceUnavailable("The sign-in provider's configuration is not usable.") from None
    except OidcProviderUnavailable as exc:
        log.warning("oidc_provider_unavailable", provider=provider, error=str(exc))
        raise ServiceUnavailable("The sign-in provider cannot be reached; try again.") from None
    await remember_authorization(runtime.cache, authorization)
    response.headers["Cache-Control"] = "no-store"
    return OidcStartOut(
        authorization_url=authorization.url,
        state=authorization.state,
        expires_in=int(AUTHORIZATION_TTL.total_seconds()),
    )


@router.post(
    "/{provider}/callback",
    response_model=TokenPairOut | MfaChallengeOut,
    responses=problem_responses(400, 403, 404, 409, 422, 429, 503),
    summary="Finish signing in with a social provider",
    dependencies=[Depends(rate_limit(CALLBACK_RATE, scope="oidc-callback"))],
)
async def callback(
    provider: ProviderName,
    body: OidcCallbackIn,
    session: SessionDep,
    runtime: RuntimeDep,
    providers: ProvidersDep,
    facts: signin.FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> TokenPairOut | MfaChallengeOut:
    """Exchanges the code, verifies the ID token and signs the user in: the account
    linked to this provider's user, else the account with the provider-verified email,
    else a new account. Answers the tokens, or ``mfa_required`` with a challenge."""
    adapter = await _enabled_provider(runtime, providers, provider)
    try:
        authorization = await take_authorization(
            runtime.cache, body.state, provider=provider, clock=runtime.clock
        )
        identity = await adapter.sign_in(body.code, authorization)
    except OidcError as exc:
        await record_audit_event(
            session,
            action="auth.login_failed",
            actor_id=None,
            target_type=None,
            target_id=None,
            ip=facts.ip,
            request_id=facts.request_id,
            data={"method": login_methods.oidc_method(provider), "reason": exc.reason.value},
            clock=runtime.clock,
        )
        raise OidcFailed().keeping_changes() from None
    except OidcProviderUnavailable as exc:
        log.warning("oidc_provider_unavailable", provider=provider, error=str(exc))
        raise ServiceUnavailable("The sign-in provider cannot be reached; try again.") from None
    outcome = await sign_in_with_identity(
        session, runtime, identity, facts=facts, display_name=body.display_name
    )
    if isinstance(outcome, MfaChallengeOut):
        return outcome
    return TokenPairOut.of(outcome)


# -- linking (the rule is documented in soko.identity.oidc) ----------------------------


async def sign_in_with_identity(
    session: AsyncSession,
    runtime: Runtime,
    identity: OidcIdentity,
    *,
    facts: signin.RequestFacts,
    display_name: str | None = None,
) -> TokenPair | MfaChallengeOut:
    """Sign in the account ``identity`` belongs to, linking or creating it."""
    method = login_methods.oidc_method(identity.provider)
    user = await _linked_user(session, runtime, identity)
    if user is None:
        user = await _link_or_create(session, runtime, identity, facts, display_name)
    await signin.refuse_unless_active(
        session, runtime, user, method=method, facts=facts, otherwise=AccountBlocked
    )
    return await signin.sign_in_or_challenge(session, runtime, user, method=method, facts=facts)


async def _linked_user(
    session: AsyncSession, runtime: Runtime, identity: OidcIdentity
) -> User | None:
    link = (
        await session.scalars(
            select(ExternalIdentity).where(
                ExternalIdentity.provider == identity.provider,
                ExternalIdentity.subject == identity.subject,
            )
        )
    ).first()
    if link is None:
        return None
    user = await session.get(User, link.user_id)
    if user is None or user.status == UserStatus.deleted.value:
        # The account was closed: this provider user starts afresh.
        await session.delete(link)
        await session.flush()
        return None
    link.last_used_at = runtime.clock.now()
    return user


async def _link_or_create(
    session: AsyncSession,
    runtime: Runtime,
    identity: OidcIdentity,
    facts: signin.RequestFacts,
    display_name: str | None,
) -> User:
    now = runtime.clock.now()
    email = _verified_email(identity)
    user = None
    if email is not None:
        user = await find_user_by_email(session, runtime.data_keys, email)
    if user is not None and user.status != UserStatus.deleted.value:
        await _check_linkable(session, user, identity)
        action = "auth.oidc_linked"
    else:
        name = (identity.name or display_name or "").strip()[:120]
        user = await create_user(
            session,
            runtime.data_keys,
            now=now,
            email=email,
            display_name=name,
            roles=(Role.customer,),
            email_verified=email is not None,
        )
        action = "account.registered"
    try:
        async with session.begin_nested():
            session.add(
                ExternalIdentity(
                    id=uuid7(),
                    user_id=user.id,
                    provider=identity.provider,
                    subject=identity.subject,
                    created_at=now,
                    last_used_at=now,
                )
            )
    except IntegrityError:
        # The same provider user finished two sign-ins at once; the other one won.
        raise Conflict("This sign-in is already being completed; sign in again.") from None
    await record_audit_event(
        session,
        action=action,
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={"method": login_methods.oidc_method(identity.provider)},
        clock=runtime.clock,
    )
    return user


def _verified_email(identity: OidcIdentity) -> str | None:
    if not identity.email_verified or identity.email is None:
        return None
    try:
        return normalize_email(identity.email)
    except ValidationFailed:
        return None  # an address we cannot use is as good as none


async def _check_linkable(session: AsyncSession, user: User, identity: OidcIdentity) -> None:
    if user.email_verified_at is None:
        # Someone may have registered this address without owning it, to take over the
        # owner's account when they later sign in with the provider (account
        # pre-hijacking). Linking waits until the address is verified here too.
        raise OidcFailed(
            "An account already uses this email address but has not verified it: verify "
            "it or reset the password, then sign in with this provider again."
        )
    other: uuid.UUID | None = await session.scalar(
        select(ExternalIdentity.id).where(
            ExternalIdentity.user_id == user.id,
            ExternalIdentity.provider == identity.provider,
        )
    )
    if other is not None:
        # Providers recycle addresses, never subjects: a second provider user with the
        # same address is someone else until the owner says otherwise.
        raise OidcFailed(f"This account is already linked to another {identity.provider} account.")
