"""Two-factor sign-in: the account holder's authenticator and recovery codes (under
``/api/v1/me/mfa``) and completing a sign-in's challenge: ``/api/v1/auth/mfa/verify``
with a code, or, for an account whose role requires MFA and that has no authenticator
yet, ``/api/v1/auth/mfa/enroll`` and ``/api/v1/auth/mfa/enroll/confirm``."""

from __future__ import annotations

from typing import Annotated, Self

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from soko.identity import mfa
from soko.identity.models import User, UserStatus
from soko.identity.permissions import ACCOUNT_SELF
from soko.identity.schemas import TokenPairOut
from soko.identity.sessions import DeviceFacts
from soko.identity.signin import RequestFacts
from soko.platform.auth import Principal, public, require
from soko.platform.errors import Forbidden, Unauthorized, problem_responses
from soko.platform.ratelimit import rate_limit
from soko.platform.runtime import Runtime, RuntimeDep, SessionDep

router = APIRouter()
# Completing a sign-in that needs a second factor: mounted under /api/v1/auth/mfa.
challenge_router = APIRouter()

Me = Annotated[Principal, require(ACCOUNT_SELF)]

TotpCode = Annotated[str, Field(min_length=1, max_length=16, examples=["123456"])]
RecoveryCodeText = Annotated[str, Field(min_length=1, max_length=32, examples=["abcde-fghij"])]


# -- shapes -----------------------------------------------------------------------------


class TotpEnrollmentOut(BaseModel):
    """A new authenticator secret: enter ``secret`` or scan ``otpauth_uri`` (as a QR
    code), then confirm with the first code the app shows. Shown once."""

    secret: str = Field(description="Base32, for typing into an authenticator app")
    otpauth_uri: str
    confirmed: bool = False


class CodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: TotpCode = Field(description="The 6-digit code the authenticator app shows now")


class ProofIn(BaseModel):
    """A fresh authenticator code or one unused recovery code (exactly one of them)."""

    model_config = ConfigDict(extra="forbid")

    code: TotpCode | None = None
    recovery_code: RecoveryCodeText | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.code is None) == (self.recovery_code is None):
            raise ValueError("send either code or recovery_code")
        return self


class ChallengeAnswerIn(ProofIn):
    challenge_token: str = Field(min_length=1, max_length=128)


class EnrollChallengeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    challenge_token: str = Field(min_length=1, max_length=128)


class EnrollChallengeConfirmIn(CodeIn):
    challenge_token: str = Field(min_length=1, max_length=128)


class RecoveryCodesOut(BaseModel):
    """Ten single-use codes for signing in without the authenticator. Shown only now:
    store them somewhere safe."""

    recovery_codes: list[str]


class EnrolledSignInOut(TokenPairOut):
    """The new session's tokens and the ten recovery codes of the authenticator just
    turned on. Both are shown only now: store the recovery codes somewhere safe."""

    recovery_codes: list[str]


class MfaStatusOut(BaseModel):
    totp_enabled: bool
    enrollment_pending: bool
    recovery_codes_left: int


# -- helpers ------------------------------------------------------------------------------


def _device(request: Request, runtime: Runtime) -> DeviceFacts:
    return RequestFacts.of(request, runtime).device


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


async def _account_holder(session: SessionDep, principal: Me) -> User:
    # An API key acts for a server, not for the person holding the phone: the second
    # factor is managed from a signed-in session only.
    if principal.session_id is None:
        raise Forbidden("Manage two-factor sign-in from a signed-in session, not an API key.")
    user = await session.get(User, principal.user_id)
    if user is None or user.status != UserStatus.active.value:
        raise Unauthorized("Sign in again.", headers={"WWW-Authenticate": "Bearer"})
    return user


AccountHolder = Annotated[User, Depends(_account_holder)]


# -- the account holder's factor ------------------------------------------------------------


@router.get("", responses=problem_responses(401, 403))
async def get_mfa_status(session: SessionDep, principal: Me) -> MfaStatusOut:
    """Whether two-factor sign-in is on, and how many recovery codes are left."""
    found = await mfa.mfa_status(session, principal.user_id)
    return MfaStatusOut(
        totp_enabled=found.totp_enabled,
        enrollment_pending=found.enrollment_pending,
        recovery_codes_left=found.recovery_codes_left,
    )


@router.post(
    "/totp",
    status_code=status.HTTP_201_CREATED,
    responses=problem_responses(401, 403, 409),
)
async def enroll_totp(
    session: SessionDep, runtime: RuntimeDep, user: AccountHolder, response: Response
) -> TotpEnrollmentOut:
    """Start enrolling an authenticator app. Enrolling again before confirming replaces
    the secret; with an authenticator already on, disable it first (409)."""
    enrollment = await mfa.enroll_totp(session, runtime, user)
    response.headers["Cache-Control"] = "no-store"
    return TotpEnrollmentOut(secret=enrollment.secret, otpauth_uri=enrollment.otpauth_uri)


@router.post("/totp/confirm", responses=problem_responses(400, 401, 403, 409))
async def confirm_totp(
    body: CodeIn,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    user: AccountHolder,
    response: Response,
) -> RecoveryCodesOut:
    """Turn two-factor sign-in on with the first code from the app; answers the ten
    recovery codes, once."""
    codes = await mfa.confirm_totp(
        session,
        runtime,
        user,
        body.code,
        ip=_device(request, runtime).ip,
        request_id=_request_id(request),
    )
    response.headers["Cache-Control"] = "no-store"
    return RecoveryCodesOut(recovery_codes=codes)


@router.post(
    "/totp/disable",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(400, 401, 403, 409),
)
async def disable_totp(
    body: ProofIn,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    user: AccountHolder,
) -> Response:
    """Turn two-factor sign-in off, proven with a fresh code or an unused recovery code.
    The recovery codes are deleted with the authenticator."""
    await mfa.disable_totp(
        session,
        runtime,
        user,
        code=body.code,
        recovery_code=body.recovery_code,
        ip=_device(request, runtime).ip,
        request_id=_request_id(request),
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/recovery-codes", responses=problem_responses(400, 401, 403, 409))
async def regenerate_recovery_codes(
    body: CodeIn,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    user: AccountHolder,
    response: Response,
) -> RecoveryCodesOut:
    """Replace all recovery codes with ten new ones (the old ones stop working), proven
    with a fresh authenticator code."""
    codes = await mfa.regenerate_recovery_codes(
        session,
        runtime,
        user,
        body.code,
        ip=_device(request, runtime).ip,
        request_id=_request_id(request),
    )
    response.headers["Cache-Control"] = "no-store"
    return RecoveryCodesOut(recovery_codes=codes)


# -- completing a sign-in ---------------------------------------------------------------------


@challenge_router.post(
    "/verify",
    dependencies=[public(), Depends(rate_limit("30/minute", scope="mfa-verify"))],
    responses=problem_responses(400, 401, 403, 429),
)
async def verify_challenge(
    body: ChallengeAnswerIn,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    response: Response,
) -> TokenPairOut:
    """Complete a sign-in that answered ``mfa_required`` with ``methods`` ``["totp",
    "recovery_code"]``: the challenge token with an authenticator code or a recovery
    code; an enrollment challenge is refused here (use ``/api/v1/auth/mfa/enroll``).
    Each challenge takes five tries and lives five minutes; a wrong code answers 400
    ``invalid-code``, a spent or expired challenge 401 ``invalid-mfa-challenge`` (sign
    in again)."""
    facts = RequestFacts.of(request, runtime)
    completed = await mfa.complete_challenge(
        session,
        runtime,
        body.challenge_token,
        code=body.code,
        recovery_code=body.recovery_code,
        device=facts.device,
        request_id=_request_id(request),
        headers=facts.headers,
    )
    response.headers["Cache-Control"] = "no-store"
    return TokenPairOut.of(completed.tokens)


@challenge_router.post(
    "/enroll",
    status_code=status.HTTP_201_CREATED,
    dependencies=[public(), Depends(rate_limit("30/minute", scope="mfa-enroll"))],
    responses=problem_responses(401, 403, 409, 429),
)
async def enroll_with_challenge(
    body: EnrollChallengeIn,
    session: SessionDep,
    runtime: RuntimeDep,
    response: Response,
) -> TotpEnrollmentOut:
    """For a sign-in that answered ``mfa_required`` with ``methods: ["enroll"]`` (the
    account's role requires an authenticator and it has none yet): a new authenticator
    secret, to confirm at ``/api/v1/auth/mfa/enroll/confirm`` with the same challenge.
    Asking again replaces the secret. A spent, expired or verify-only challenge answers
    401 ``invalid-mfa-challenge``."""
    enrollment = await mfa.begin_challenge_enrollment(session, runtime, body.challenge_token)
    response.headers["Cache-Control"] = "no-store"
    return TotpEnrollmentOut(secret=enrollment.secret, otpauth_uri=enrollment.otpauth_uri)


@challenge_router.post(
    "/enroll/confirm",
    dependencies=[public(), Depends(rate_limit("30/minute", scope="mfa-enroll"))],
    responses=problem_responses(400, 401, 403, 409, 429),
)
async def confirm_enrollment_with_challenge(
    body: EnrollChallengeConfirmIn,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    response: Response,
) -> EnrolledSignInOut:
    """Turn the authenticator on with the first code it shows and finish signing in:
    answers the session's tokens and the ten recovery codes, once. The challenge takes
    five codes and lives five minutes; a wrong code answers 400 ``invalid-code``, a
    spent or expired challenge 401 ``invalid-mfa-challenge`` (sign in again)."""
    facts = RequestFacts.of(request, runtime)
    enrolled = await mfa.complete_challenge_enrollment(
        session,
        runtime,
        body.challenge_token,
        body.code,
        device=facts.device,
        request_id=_request_id(request),
        headers=facts.headers,
    )
    response.headers["Cache-Control"] = "no-store"
    return EnrolledSignInOut(
        **TokenPairOut.of(enrolled.tokens).model_dump(), recovery_codes=enrolled.recovery_codes
    )
