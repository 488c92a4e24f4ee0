"""Identity routes: sign-in and sign-up by SMS code (mounted under /api/v1/auth/otp)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Response, status
from pydantic import BaseModel, ConfigDict, Field

from soko.identity import sms_codes
from soko.identity.schemas import MfaChallengeOut, TokenPairOut
from soko.identity.signin import FactsDep
from soko.platform.auth import Principal, public
from soko.platform.errors import problem_responses
from soko.platform.ratelimit import rate_limit
from soko.platform.runtime import RuntimeDep, SessionDep

# Each wrong guess is a recorded failure (an audit event): bounded per client address,
# with room for the guesses of many people behind one carrier's address.
VERIFY_RATE = "20/minute;200/day"

router = APIRouter()

PhoneField = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        description="The phone number, best in international form (+254712345678)",
        examples=["+254712345678", "0712 345 678"],
    ),
]
RegionField = Annotated[
    str | None,
    Field(
        None,
        pattern=r"^[A-Za-z]{2}$",
        description="The country (ISO 3166 alpha-2) of a number given without its +code",
        examples=["KE"],
    ),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeRequestIn(_Body):
    phone: PhoneField
    default_region: RegionField = None
    purpose: Literal["sign_in"] = Field(
        "sign_in", description="sign_in: sign in the number's account, or create one"
    )


class CodeSentOut(BaseModel):
    expires_in: int = Field(description="Seconds the code stays valid")
    resend_after: int = Field(description="Seconds before another code can be asked for")


class CodeVerifyIn(_Body):
    phone: PhoneField
    default_region: RegionField = None
    code: str = Field(min_length=1, max_length=16, examples=["123456"])
    purpose: Literal["sign_in"] = "sign_in"
    display_name: str = Field(
        "", max_length=120, description="Used only when the code creates a new account"
    )


def _region(raw: str | None) -> str | None:
    return raw.upper() if raw else None


@router.post(
    "/request",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CodeSentOut,
    summary="Text a one-time sign-in code to a phone number",
    responses=problem_responses(403, 422, 429),
)
async def request_code(
    body: CodeRequestIn,
    session: SessionDep,
    runtime: RuntimeDep,
    facts: FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> CodeSentOut:
    """Sends a 6-digit code valid for 5 minutes; a new code replaces the previous one.
    The answer is the same whether or not the number has an account. One code a minute
    per number, and a daily cap per number and per address (429 with ``Retry-After``)."""
    sent = await sms_codes.request_code(
        session,
        runtime,
        phone=body.phone,
        default_region=_region(body.default_region),
        purpose=sms_codes.CodePurpose(body.purpose),
        facts=facts,
    )
    return CodeSentOut(expires_in=sent.expires_in, resend_after=sent.resend_after)


@router.post(
    "/verify",
    response_model=TokenPairOut | MfaChallengeOut,
    summary="Sign in, or sign up, with a code received by SMS",
    responses={
        201: {"description": "A new account was created", "model": TokenPairOut},
        **problem_responses(400, 403, 422, 429),
    },
    dependencies=[Depends(rate_limit(VERIFY_RATE, scope="otp-verify"))],
)
async def verify_code(
    body: CodeVerifyIn,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
    facts: FactsDep,
    _caller: Annotated[Principal | None, public()],
) -> TokenPairOut | MfaChallengeOut:
    """Signs in the account with this number (200), or creates a customer account with
    the number verified (201). Accounts with two-factor sign-in answer ``mfa_required``
    with a challenge to complete at ``POST /api/v1/auth/mfa/verify``. A code allows five
    guesses; after that, or after 5 minutes, ask for a new one. Guesses are also limited
    per client address (20 a minute, 200 a day; 429 with ``Retry-After``)."""
    result = await sms_codes.verify_code(
        session,
        runtime,
        phone=body.phone,
        code=body.code,
        default_region=_region(body.default_region),
        display_name=body.display_name,
        purpose=sms_codes.CodePurpose(body.purpose),
        facts=facts,
    )
    if isinstance(result.outcome, MfaChallengeOut):
        return result.outcome
    if result.created:
        response.status_code = status.HTTP_201_CREATED
    return TokenPairOut.of(result.outcome)
