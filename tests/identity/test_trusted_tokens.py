"""An access token's claims taken as issued (ADR 0019): with no read, once the process
has heard every change since the token was issued; and every change to the user or the
session (a block, a role change, a revoked session) still takes effect at once, in the
process that made it and in every other one."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import httpx2
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from soko.app import create_app
from soko.identity.models import Role, User, UserStatus
from soko.identity.principals import ACCESS_TOKEN_STATES, ISSUE_DELAY_SECONDS
from soko.identity.sessions import issue_access_token, start_session
from soko.platform.cache import RedisCache
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.runtime import Runtime
from tests.conftest import sql_statements
from tests.identity.admin_support import HOUR_SECONDS, answered_soon
from tests.identity.conftest import TEST_DEVICE, MakeUser, SignedInUser
from tests.platform.test_cache_near import eventually

ADMIN_USERS = "/api/v1/admin/users"
SESSIONS = "/api/v1/me/sessions"


def _states(source: str) -> float:
    ACCESS_TOKEN_STATES.labels(source)  # the series exists before its first count
    sample = REGISTRY.get_sample_value("soko_access_token_states_total", {"source": source})
    return sample or 0.0


class Sources:
    """How many access tokens were taken as issued, and how many had their state read,
    since it was made."""

    def __init__(self) -> None:
        self.start = {source: _states(source) for source in ("token", "read")}

    def __call__(self) -> dict[str, float]:
        return {source: _states(source) - start for source, start in self.start.items()}


async def _set_roles(
    client: httpx2.AsyncClient, admin: SignedInUser, user: SignedInUser, *roles: str
) -> None:
    changed = await client.put(
        f"{ADMIN_USERS}/{user.user_id}/roles", headers=admin.headers, json={"roles": roles}
    )
    assert changed.status_code == 200, changed.text


def _bearer(runtime: Runtime, user: SignedInUser, *roles: str) -> dict[str, str]:
    """The headers of a new access token for ``user``'s session, with ``roles``."""
    token = issue_access_token(
        runtime,
        user_id=user.user_id,
        session_id=user.tokens.session_id,
        roles=frozenset(roles),
        mfa_verified=False,
    )
    return {"Authorization": f"Bearer {token}"}


def _past_the_leeway(runtime: Runtime, clock: ManualClock) -> None:
    """Move on until tokens issued from now on are issued after this process began
    hearing every change, by more than the leeway and the issuer's delay."""
    clock.advance(
        dt.timedelta(seconds=runtime.settings.token_leeway_seconds + ISSUE_DELAY_SECONDS + 1)
    )


async def test_a_token_issued_after_the_leeway_is_taken_as_issued(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, make_user: MakeUser
) -> None:
    _past_the_leeway(runtime, clock)
    operator = await make_user(Role.operator)
    sources = Sources()
    with sql_statements(runtime) as sent:
        response = await client.get(ADMIN_USERS, headers=operator.headers)
    assert response.status_code == 200
    assert sources() == {"token": 1, "read": 0}
    assert not any("auth_sessions" in statement for statement in sent)


async def test_a_token_issued_within_the_leeway_of_the_start_is_read(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    operator = await make_user(Role.operator)  # the process started a moment ago
    sources = Sources()
    assert (await client.get(ADMIN_USERS, headers=operator.headers)).status_code == 200
    assert sources() == {"token": 0, "read": 1}


async def test_a_block_a_role_change_and_a_revoked_session_take_effect_at_once(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, make_user: MakeUser
) -> None:
    _past_the_leeway(runtime, clock)
    admin = await make_user(Role.admin)
    demoted, blocked, signed_out = [await make_user(Role.operator) for _ in range(3)]
    for user in (demoted, blocked, signed_out):
        assert (await client.get(ADMIN_USERS, headers=user.headers)).status_code == 200

    await _set_roles(client, admin, demoted, "customer")
    assert (await client.get(ADMIN_USERS, headers=demoted.headers)).status_code == 403

    assert (
        await client.post(f"{ADMIN_USERS}/{blocked.user_id}/block", headers=admin.headers)
    ).status_code == 200
    assert (await client.get(SESSIONS, headers=blocked.headers)).status_code == 401

    revoked = await client.delete(
        f"{SESSIONS}/{signed_out.tokens.session_id}", headers=signed_out.headers
    )
    assert revoked.status_code == 204, revoked.text
    assert (await client.get(SESSIONS, headers=signed_out.headers)).status_code == 401
    # The admin's own token, untouched, is still taken as issued.
    sources = Sources()
    assert (await client.get(ADMIN_USERS, headers=admin.headers)).status_code == 200
    assert sources() == {"token": 1, "read": 0}


async def test_a_token_issued_within_the_leeway_after_a_change_is_read(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, make_user: MakeUser
) -> None:
    _past_the_leeway(runtime, clock)
    admin = await make_user(Role.admin)
    user = await make_user(Role.customer)
    await _set_roles(client, admin, user, "operator")
    # A token whose roles were read just before the change, issued just after it (a
    # refresh racing the change): its claims are stale, and they are not taken.
    stale = _bearer(runtime, user, "customer")
    sources = Sources()
    answered = await client.get(ADMIN_USERS, headers=stale)
    assert answered.status_code == 200  # the roles read: operator
    assert sources() == {"token": 0, "read": 1}
    _past_the_leeway(runtime, clock)
    fresh = _bearer(runtime, user, "operator")
    assert (await client.get(ADMIN_USERS, headers=fresh)).status_code == 200
    assert sources() == {"token": 1, "read": 1}


async def test_a_token_without_the_second_factor_claim_is_read(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, make_user: MakeUser
) -> None:
    """Tokens of an earlier release carry no ``mfa`` claim: their state is read."""
    _past_the_leeway(runtime, clock)
    user = await make_user(Role.operator)
    settings = runtime.settings
    earlier = runtime.signing_keys.issue(
        {"sid": str(user.tokens.session_id), "roles": ["operator"]},
        ttl=dt.timedelta(seconds=settings.access_token_ttl_seconds),
        clock=runtime.clock,
        issuer=settings.effective_token_issuer,
        audience=settings.token_audience,
        subject=str(user.user_id),
        jti=uuid.uuid4().hex,
    )
    sources = Sources()
    answered = await client.get(ADMIN_USERS, headers={"Authorization": f"Bearer {earlier}"})
    assert answered.status_code == 200
    assert sources() == {"token": 0, "read": 1}


async def test_no_session_is_opened_for_an_account_that_is_not_active(
    runtime: Runtime, make_user: MakeUser
) -> None:
    user = await make_user(Role.customer)
    for status in (UserStatus.blocked, UserStatus.deleted):
        async with runtime.db.transaction() as session:
            account = await session.get(User, user.user_id)
            assert account is not None
            account.status = status.value
            with pytest.raises(ValueError, match="only for an active account"):
                await start_session(session, runtime, account, method="test", device=TEST_DEVICE)


# -- across processes ------------------------------------------------------------------------------


@pytest.fixture
async def two_processes(
    settings: Settings, clock: ManualClock, runtime: Runtime, redis_url: str, redis_namespace: str
) -> AsyncIterator[tuple[httpx2.AsyncClient, httpx2.AsyncClient]]:
    """The test's ``runtime`` and another API process over the same database and one
    Redis, both listening for changes, the clock past the leeway."""
    other = Runtime(settings, clock=clock)
    other.signing_keys = runtime.signing_keys
    clients = Redis.from_url(redis_url), Redis.from_url(redis_url)
    # Near copies kept past answered_soon's wait: only an invalidation heard ends them.
    runtime.cache = RedisCache(clients[0], namespace=redis_namespace, clock=clock)
    other.cache = RedisCache(
        clients[1], namespace=redis_namespace, clock=clock, near_seconds=HOUR_SECONDS
    )
    for cache in (runtime.cache, other.cache):
        cache.listen()
        await eventually(lambda cache=cache: cache.journal.known_since is not None)
    _past_the_leeway(runtime, clock)
    try:
        async with (
            httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=create_app(runtime=runtime)),
                base_url="http://testserver",
            ) as first,
            httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=create_app(runtime=other)),
                base_url="http://testserver",
            ) as second,
        ):
            yield first, second
    finally:
        await other.stop()
        await runtime.cache.close()
        for client in clients:
            await client.aclose()


@pytest.mark.redis
async def test_a_change_made_in_one_process_stops_the_token_in_another(
    two_processes: tuple[httpx2.AsyncClient, httpx2.AsyncClient], make_user: MakeUser
) -> None:
    first, second = two_processes
    admin = await make_user(Role.admin)
    demoted, blocked = await make_user(Role.operator), await make_user(Role.operator)
    sources = Sources()
    for user in (demoted, blocked):
        assert (await second.get(ADMIN_USERS, headers=user.headers)).status_code == 200
    assert sources() == {"token": 2, "read": 0}

    await _set_roles(first, admin, demoted, "customer")
    await first.post(f"{ADMIN_USERS}/{blocked.user_id}/block", headers=admin.headers)

    # Heard once the second process's listener reads the channel (ADR 0013): within
    # milliseconds, but in a test sharing one event loop, maybe after the next request.
    assert await answered_soon(second, ADMIN_USERS, demoted.headers, 403) == 403
    assert await answered_soon(second, ADMIN_USERS, blocked.headers, 401) == 401


async def test_with_no_leeway_the_issuers_delay_still_counts(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, make_user: MakeUser
) -> None:
    """A leeway of 0 (clocks in step) still leaves the issuer's own delay between
    reading a token's state and signing it: a change heard a second before ``iat`` may
    have come after that read."""
    runtime.settings = runtime.settings.model_copy(update={"token_leeway_seconds": 0})
    _past_the_leeway(runtime, clock)
    admin = await make_user(Role.admin)
    user = await make_user(Role.customer)
    await _set_roles(client, admin, user, "operator")
    clock.advance(dt.timedelta(seconds=1))
    stale = _bearer(runtime, user, "customer")
    sources = Sources()
    answered = await client.get(ADMIN_USERS, headers=stale)
    assert answered.status_code == 200  # operator, as read
    assert sources() == {"token": 0, "read": 1}
