"""Time claims out of range: a properly signed token whose ``exp``, ``nbf`` or ``iat`` is
not a number between the epoch and the year 9999 is malformed, a plain 401 like any
other invalid token, never an OverflowError from reading it as a datetime."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import httpx2
import jwt
import pytest

from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from soko.platform.tokens import NUMERIC_DATE_MAX, InvalidToken, KeyRing, TokenRejection
from tests.platform.test_tokens import AUDIENCE, ISSUER, START, claims_at, sign_raw

OUT_OF_RANGE = [
    # fromtimestamp: "timestamp out of range for platform time_t"
    pytest.param(10**20, id="1e20"),
    pytest.param(-(10**20), id="-1e20"),
    pytest.param(10**400, id="400-digits"),  # float(): "int too large to convert to float"
    pytest.param(-1, id="before-the-epoch"),
    pytest.param(NUMERIC_DATE_MAX + 1, id="after-9999-12-31"),
    pytest.param(1e300, id="1e300"),
    # json.loads reads NaN and Infinity, so a signed payload can carry them.
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("-inf"), id="-inf"),
]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate()


def _signed(ring: KeyRing, payload: dict[str, Any]) -> str:
    header = {"alg": "EdDSA", "kid": ring.active.kid, "typ": "at+jwt"}
    return sign_raw(ring.active, header, json.dumps(payload).encode())


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", OUT_OF_RANGE)
def test_time_claims_out_of_range_are_malformed(
    claim: str, value: Any, ring: KeyRing, clock: ManualClock
) -> None:
    token = _signed(ring, claims_at(START, **{claim: value}))
    with pytest.raises(InvalidToken) as caught:
        ring.verify(token, audience=AUDIENCE, issuer=ISSUER, clock=clock)
    assert caught.value.reason is TokenRejection.malformed
    assert caught.value.status == 401
    # Asked again, the token is refused again (the times are checked on every call).
    with pytest.raises(InvalidToken):
        ring.verify(token, audience=AUDIENCE, issuer=ISSUER, clock=clock)


def test_the_ends_of_the_range_are_accepted(ring: KeyRing, clock: ManualClock) -> None:
    token = _signed(ring, claims_at(START, exp=NUMERIC_DATE_MAX, nbf=0))
    verified = ring.verify(token, audience=AUDIENCE, issuer=ISSUER, clock=clock)
    assert verified.expires_at == dt.datetime(9999, 12, 31, tzinfo=dt.UTC)
    late = ManualClock(dt.datetime(9999, 12, 30, tzinfo=dt.UTC))
    assert ring.verify(token, audience=AUDIENCE, issuer=ISSUER, clock=late).subject


@pytest.mark.parametrize("value", OUT_OF_RANGE[:3])
async def test_the_api_answers_401_to_a_signed_token_with_an_absurd_expiry(
    client: httpx2.AsyncClient, runtime: Runtime, value: int
) -> None:
    # Signed with the application's own key ring, with every other claim as issued.
    settings = runtime.settings
    key = runtime.signing_keys.active
    assert key.private_key is not None
    now = int(runtime.clock.now().timestamp())
    claims = {
        "iss": settings.effective_token_issuer,
        "aud": settings.token_audience,
        "sub": str(uuid.uuid4()),
        "sid": str(uuid.uuid4()),
        "roles": ["customer"],
        "mfa": False,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    headers = {"kid": key.kid, "typ": "at+jwt"}

    def bearer(**changed: Any) -> dict[str, str]:
        token = jwt.encode(
            {**claims, **changed}, key.private_key, algorithm=key.alg, headers=headers
        )
        return {"Authorization": f"Bearer {token}"}

    expired = await client.get("/api/v1/me", headers=bearer(exp=now - 3600))
    absurd = await client.get("/api/v1/me", headers=bearer(exp=value))
    assert absurd.status_code == 401, absurd.text
    assert absurd.headers["content-type"] == "application/problem+json"
    assert absurd.headers["www-authenticate"] == expired.headers["www-authenticate"]
    assert absurd.json()["type"] == expired.json()["type"]
    assert absurd.json()["detail"] == "The access token is not valid."
