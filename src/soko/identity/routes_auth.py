"""Identity routes: password accounts (mounted under /api/v1/auth).

Registration, sign-in with an email or phone and a password, token refresh, sign-out,
email verification and password reset. Sign-in by SMS code lives in ``routes_otp`` and
the second factor in ``routes_mfa``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from soko.identity import signin
from soko.identity.passwords import NEW_PASSWORD_DESCRIPTION
from soko.identity.schemas import MfaChallengeOut, TokenPairOut
from soko.identity.sessions import refresh_session
from soko.platform.auth import Principal, public, require
from soko.platform.errors import problem_responses
from soko.platform.ratelimit import rate_limit
from soko.platform.runtime import RuntimeDep, SessionDep

log = structlog.get_logger("soko.identity.signin")

router = APIRouter()

# Per client address, on top of the global limit: account creation and reset mails are
# what spammers and SMS/email pumpers aim at.
REGISTER_RATE = "10/minute;100/day"
PASSWORD_FORGOT_RATE = "5/minute;30/day"

# Long enough for any passphrase the policy accepts (and to report a longer one as too
# long), short enough that nobody makes the server hash a megabyte.
PASSWORD_FIELD_MAX = 4096


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterIn(_Body):
    email: str = Field(max_length=320, examples=["amina@example.com"])
    password: str = Field(
        min_length=1, max_length=PASSWORD_FIELD_MAX, description=NEW_PASSWORD_DESCRIPTION
    )
    display_name: str = Field("", max_length=120, examples=["Amina W."])


class LoginIn(_Body):
    identifier: str = Field(
        min_length=1,
        max_length=320,
        description="The account's email address or phone number in E.164 (+254712345678)",
        examples=["amina@example.com", "+254712345678"],
    )
    password: str = Field(min_length=1, max_length=PASSWORD_FIELD_MAX)


class RefreshIn(_Body):
    refresh_token: str = Field(min_length=1, max_length=256)


class LogoutIn(_Body):
    refresh_token: str | None = Field(
        None,
        max_length=256,
        description="Also end the session this refresh token belongs to (yours only)",
    )


class ForgotPasswordIn(_Body):
    identifier: str = Field(min_length=1, max_length=320)


class ResetPasswordIn(_Body):
    token: str = Field(min_length=1, max_length=256, description="From the reset link")
    new_password: str = Field(
        min_length=1, max_length=PASSWORD_FIELD_MAX, description=NEW_PASSWORD_DESCRIPTION
    )


class VerifyEmailIn(_Body):
    token: str = Field(min_length=1, max_length=256, description="From the verification link")


@functools.cache
def _route_limit(rate: str, scope: str) -> Callable[[Request, Response], Awaitable[None]]:
    return rate_limit(rate, scope=scope)


async def login_rate_limit(request: Request, response: Response) -> None:
    """The per-address sign-in limit, read from the settings at each request (not when
    the module is imported) so it follows the running configuration."""
    rate: str = request.app.state.runtime.settings.login_rate_limit
    await _route_limit(rate, "login")(request, response)


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenPairOut | MfaChallengeOut,
    summary="Create an account with an email address and a password",
    responses=problem_responses(403, 409, 422, 429),
    dependencies=[Depends(rate_limit(REGISTER_RATE, scope="register"))],
)
async def register(
    body: RegisterIn,
    session: SessionDep,
    runtime: RuntimeDep,
    facts: signin.FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> TokenPairOut | MfaChallengeOut:
    """Creates a customer account, mails a link that verifies the address, and signs
    the new user in; when the operator requires a second factor for customers, answers
    the challenge that enrolls one instead. Phone numbers sign up with an SMS code."""
    pair = await signin.register_with_password(
        session,
        runtime,
        email=body.email,
        password=body.password,
        display_name=body.display_name,
        facts=facts,
    )
    return pair if isinstance(pair, MfaChallengeOut) else TokenPairOut.of(pair)


@router.post(
    "/login",
    response_model=TokenPairOut | MfaChallengeOut,
    summary="Sign in with an email or phone number and a password",
    responses=problem_responses(401, 403, 422, 429),
    dependencies=[Depends(login_rate_limit)],
)
async def login(
    body: LoginIn,
    session: SessionDep,
    runtime: RuntimeDep,
    facts: signin.FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> TokenPairOut | MfaChallengeOut:
    """Answers the session's tokens, or ``mfa_required`` with a challenge to complete at
    ``POST /api/v1/auth/mfa/verify``. Failed attempts make the account and the address
    wait longer and longer (429 with ``Retry-After``), never for more than 15 minutes."""
    outcome = await signin.sign_in_with_password(
        session, runtime, identifier=body.identifier, password=body.password, facts=facts
    )
    if isinstance(outcome, MfaChallengeOut):
        return outcome
    return TokenPairOut.of(outcome)


@router.post(
    "/refresh",
    response_model=TokenPairOut,
    summary="Exchange a refresh token for a new token pair",
    responses=problem_responses(401, 422),
)
async def refresh(
    body: RefreshIn,
    session: SessionDep,
    runtime: RuntimeDep,
    facts: signin.FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> TokenPairOut:
    """The refresh token is rotated: use the new one next time. Presenting a used one
    again signs its session out."""
    pair = await refresh_session(session, runtime, body.refresh_token, device=facts.device)
    return TokenPairOut.of(pair)


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Sign out",
    responses=problem_responses(401),
)
async def logout(
    session: SessionDep,
    runtime: RuntimeDep,
    facts: signin.FactsDep,
    principal: Annotated[Principal, require()],
    body: LogoutIn | None = None,
) -> Response:
    """Ends the session of the access token sent, and the one of ``refresh_token`` when
    given."""
    await signin.sign_out(
        session,
        runtime,
        principal,
        refresh_token=body.refresh_token if body is not None else None,
        facts=facts,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/password/forgot",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Ask for a password reset link",
    responses=problem_responses(422, 429),
    dependencies=[Depends(rate_limit(PASSWORD_FORGOT_RATE, scope="password-forgot"))],
)
async def forgot_password(
    body: ForgotPasswordIn,
    session: SessionDep,
    runtime: RuntimeDep,
    facts: signin.FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> Response:
    """Always answers 202, whether or not an account exists: when one does and has an
    email address, a link valid for 30 minutes is mailed to it."""
    sent = await signin.request_password_reset(
        session, runtime, identifier=body.identifier, facts=facts
    )
    log.info("password_reset_requested", link_sent=sent)
    return Response(status_code=status.HTTP_202_ACCEPTED)


@router.post(
    "/password/reset",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Choose a new password with a reset link's token",
    responses=problem_responses(400, 422),
)
async def reset_password(
    body: ResetPasswordIn,
    session: SessionDep,
    runtime: RuntimeDep,
    facts: signin.FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> Response:
    """Signs every session of the account out; sign in again with the new password."""
    await signin.reset_password(
        session, runtime, token=body.token, new_password=body.new_password, facts=facts
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/email/verify",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Confirm an email address with a verification link's token",
    responses=problem_responses(400, 422),
)
async def verify_email(
    body: VerifyEmailIn,
    session: SessionDep,
    runtime: RuntimeDep,
    facts: signin.FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> Response:
    await signin.verify_email(session, runtime, token=body.token, facts=facts)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
