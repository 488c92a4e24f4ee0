"""The device list: listing, revoking one session, signing out everywhere, and changing
the password (which signs the other devices out)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import select

from soko.app import create_app
from soko.identity.models import AuthSession, User
from soko.identity.passwords import password_hasher
from soko.platform.cache import RedisCache
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.conftest import make_settings, processes_over_one_redis
from tests.identity.me_support import (
    IPHONE_SAFARI,
    PASSWORD,
    audit_events,
    bearer,
    make_account,
    refresh_refused,
    sign_in_again,
)

SESSIONS = "/api/v1/me/sessions"


@pytest.fixture(params=["memory-cache", "redis-cache"])
async def cached_runtime(
    request: pytest.FixtureRequest, runtime: Runtime, tmp_path: Path, database_url: str
) -> AsyncIterator[Runtime]:
    """The runtime with the principal cache in memory, then in Redis: a revocation must
    reach both at once."""
    if request.param == "memory-cache":
        yield runtime
        return
    redis_url = request.getfixturevalue("redis_url")
    # Keys of this test only (the server is shared with other test runs), removed after.
    namespace = f"sokotest:{uuid.uuid4().hex[:12]}:cache:"
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_url, cache_backend="redis"
    )
    shared = Runtime(settings, clock=ManualClock())
    shared.cache = RedisCache(shared.redis, namespace=namespace, clock=shared.clock)
    try:
        yield shared
    finally:
        async for key in shared.redis.scan_iter(match=f"{namespace}*", count=500):
            await shared.redis.delete(key)
        await shared.stop()


@pytest.fixture
async def cached_client(cached_runtime: Runtime) -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=create_app(runtime=cached_runtime))
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


# -- listing ------------------------------------------------------------------------------


async def test_lists_live_sessions_newest_first_marking_the_current_one(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    assert isinstance(runtime.clock, ManualClock)
    account = await make_account(runtime)
    runtime.clock.advance(60)
    phone = await sign_in_again(runtime, account.user_id, method="sms")
    runtime.clock.advance(60)
    revoked = await sign_in_again(runtime, account.user_id)
    stranger = await make_account(runtime)
    assert (
        await client.delete(f"{SESSIONS}/{revoked.session_id}", headers=account.headers)
    ).status_code == 204

    response = await client.get(SESSIONS, headers=account.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["next_cursor"] is None
    assert [item["id"] for item in body["items"]] == [
        str(phone.session_id),
        str(account.pair.session_id),
    ]
    newest, oldest = body["items"]
    assert newest == {
        "id": str(phone.session_id),
        "device_name": "Safari on iPhone",
        "ip": "41.90.64.7",
        "method": "sms",
        "created_at": newest["created_at"],
        "last_seen_at": newest["last_seen_at"],
        "current": False,
    }
    assert oldest["device_name"] == "Chrome on Android"
    assert oldest["ip"] == "197.248.10.20"
    assert oldest["current"] is True
    assert str(stranger.pair.session_id) not in response.text

    # Seen from the other device, that one is current.
    other_view = await client.get(SESSIONS, headers=bearer(phone))
    assert [item["current"] for item in other_view.json()["items"]] == [True, False]


async def test_expired_sessions_are_not_listed(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    assert isinstance(runtime.clock, ManualClock)
    account = await make_account(runtime)
    old = await sign_in_again(runtime, account.user_id)
    async with runtime.db.transaction() as session:
        row = await session.get(AuthSession, old.session_id)
        assert row is not None
        row.expires_at = runtime.clock.now()
    listed = (await client.get(SESSIONS, headers=account.headers)).json()["items"]
    assert [item["id"] for item in listed] == [str(account.pair.session_id)]


async def test_the_list_pages_with_a_cursor_bound_to_its_owner(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    assert isinstance(runtime.clock, ManualClock)
    account = await make_account(runtime)
    for _ in range(4):
        runtime.clock.advance(1)
        await sign_in_again(runtime, account.user_id)
    other = await make_account(runtime)
    seen: list[str] = []
    cursors: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get(SESSIONS, headers=account.headers, params=params)).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        cursors.append(cursor)
    # Another user's list refuses this user's cursor.
    foreign = await client.get(
        SESSIONS, headers=other.headers, params={"limit": 2, "cursor": cursors[0]}
    )
    assert foreign.status_code == 400
    assert foreign.json()["type"] == "/problems/invalid-cursor"
    assert pages == 3
    assert len(seen) == len(set(seen)) == 5
    assert seen[-1] == str(account.pair.session_id)  # the first sign-in, oldest


async def test_fields_selects_what_each_session_shows(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    response = await client.get(
        SESSIONS, headers=account.headers, params={"fields": "device_name,current"}
    )
    assert response.json()["items"] == [
        {"id": str(account.pair.session_id), "device_name": "Chrome on Android", "current": True}
    ]


# -- revoking one ------------------------------------------------------------------------------


async def test_a_revoked_session_stops_at_once(
    cached_client: httpx2.AsyncClient, cached_runtime: Runtime
) -> None:
    runtime, client = cached_runtime, cached_client
    account = await make_account(runtime)
    lost_phone = await sign_in_again(runtime, account.user_id)
    # The lost phone's token is good, and its principal now sits in the cache.
    assert (await client.get("/api/v1/me", headers=bearer(lost_phone))).status_code == 200
    cached = await runtime.cache.get(f"identity:principal:{lost_phone.session_id}")
    assert cached and cached["active"] is True

    response = await client.delete(
        f"{SESSIONS}/{lost_phone.session_id}",
        headers={**account.headers, "X-Request-ID": "revoke-lost-phone"},
    )
    assert response.status_code == 204, response.text

    refused = await client.get("/api/v1/me", headers=bearer(lost_phone))
    assert refused.status_code == 401
    assert await refresh_refused(client, lost_phone.refresh_token)
    # The device that revoked it carries on.
    assert (await client.get("/api/v1/me", headers=account.headers)).status_code == 200
    assert not await refresh_refused(client, account.pair.refresh_token)

    async with runtime.db.transaction(read_only=True) as session:
        row = await session.get(AuthSession, lost_phone.session_id)
        assert row is not None
        assert row.revoked_at == runtime.clock.now()
        assert row.revoked_reason == "revoked_by_user"
    (event,) = await audit_events(runtime, "auth.session_revoked")
    assert event["actor_id"] == account.user_id
    assert (event["target_type"], event["target_id"]) == ("session", str(lost_phone.session_id))
    assert event["request_id"] == "revoke-lost-phone"
    assert event["data"]["current"] is False


@pytest.mark.redis
async def test_a_session_revoked_in_one_process_stops_in_another(
    tmp_path: Path, database_url: str, redis_url: str, runtime: Runtime
) -> None:
    """Two API processes over one Redis: the one that did not revoke held the session's
    state as a near copy, and drops it as soon as the change reaches it."""
    async with processes_over_one_redis(tmp_path, database_url, redis_url, runtime) as (
        first,
        second,
    ):
        assert isinstance(second.cache, RedisCache)
        account = await make_account(runtime)
        lost_phone = await sign_in_again(runtime, account.user_id)
        one = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=create_app(runtime=first)), base_url="http://a"
        )
        other = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=create_app(runtime=second)), base_url="http://b"
        )
        async with one, other:
            # The second process hears changes, then keeps the lost phone's state near.
            assert (await other.get("/api/v1/me", headers=bearer(lost_phone))).status_code == 200
            async with asyncio.timeout(5):
                while not second.cache.near.listening:
                    await asyncio.sleep(0.01)
            assert (await other.get("/api/v1/me", headers=bearer(lost_phone))).status_code == 200
            assert second.cache.near.get(f"identity:principal:{lost_phone.session_id}")

            heard = second.cache.near.mark
            revoked = await one.delete(
                f"{SESSIONS}/{lost_phone.session_id}", headers=account.headers
            )
            assert revoked.status_code == 204, revoked.text
            async with asyncio.timeout(5):
                while second.cache.near.mark == heard:
                    await asyncio.sleep(0.001)
            assert (await other.get("/api/v1/me", headers=bearer(lost_phone))).status_code == 401
            assert (await other.get("/api/v1/me", headers=account.headers)).status_code == 200


async def test_revoking_the_current_session_signs_it_out(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    response = await client.delete(f"{SESSIONS}/{account.pair.session_id}", headers=account.headers)
    assert response.status_code == 204
    assert (await client.get("/api/v1/me", headers=account.headers)).status_code == 401


async def test_another_users_session_answers_like_a_missing_one(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    victim = await make_account(runtime)
    theirs = await client.delete(f"{SESSIONS}/{victim.pair.session_id}", headers=account.headers)
    missing = await client.delete(f"{SESSIONS}/{uuid.uuid4()}", headers=account.headers)
    assert theirs.status_code == missing.status_code == 404
    strip = {"instance", "request_id"}
    assert {k: v for k, v in theirs.json().items() if k not in strip} == {
        k: v for k, v in missing.json().items() if k not in strip
    }
    # The victim's session is untouched.
    assert (await client.get("/api/v1/me", headers=victim.headers)).status_code == 200
    assert not await refresh_refused(client, victim.pair.refresh_token)
    assert await audit_events(runtime, "auth.session_revoked") == []


async def test_revoking_twice_answers_the_same_and_audits_once(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    other = await sign_in_again(runtime, account.user_id)
    for _ in range(2):
        response = await client.delete(f"{SESSIONS}/{other.session_id}", headers=account.headers)
        assert response.status_code == 204
    assert len(await audit_events(runtime, "auth.session_revoked")) == 1


async def test_a_malformed_session_id_is_a_validation_error(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    response = await client.delete(f"{SESSIONS}/not-a-session", headers=account.headers)
    assert response.status_code == 422


# -- signing out everywhere ----------------------------------------------------------------------


async def test_sign_out_everywhere_revokes_every_session(
    cached_client: httpx2.AsyncClient, cached_runtime: Runtime
) -> None:
    runtime, client = cached_runtime, cached_client
    account = await make_account(runtime)
    others = [await sign_in_again(runtime, account.user_id) for _ in range(2)]
    bystander = await make_account(runtime)
    for pair in (account.pair, *others):
        assert (await client.get("/api/v1/me", headers=bearer(pair))).status_code == 200

    response = await client.post(f"{SESSIONS}/revoke-all", headers=account.headers)
    assert response.status_code == 204, response.text

    for pair in (account.pair, *others):
        assert (await client.get("/api/v1/me", headers=bearer(pair))).status_code == 401
        assert await refresh_refused(client, pair.refresh_token)
    assert (await client.get("/api/v1/me", headers=bystander.headers)).status_code == 200
    (event,) = await audit_events(runtime, "auth.sessions_revoked")
    assert event["actor_id"] == account.user_id
    assert event["data"] == {"revoked": 3, "kept_current": False}


async def test_sign_out_everywhere_else_keeps_the_current_session(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    others = [await sign_in_again(runtime, account.user_id) for _ in range(2)]
    response = await client.post(
        f"{SESSIONS}/revoke-all", headers=account.headers, params={"keep_current": "true"}
    )
    assert response.status_code == 204
    assert (await client.get("/api/v1/me", headers=account.headers)).status_code == 200
    for pair in others:
        assert (await client.get("/api/v1/me", headers=bearer(pair))).status_code == 401
    listed = (await client.get(SESSIONS, headers=account.headers)).json()["items"]
    assert [item["id"] for item in listed] == [str(account.pair.session_id)]
    (event,) = await audit_events(runtime, "auth.sessions_revoked")
    assert event["data"] == {"revoked": 2, "kept_current": True}


# -- changing the password --------------------------------------------------------------------


async def test_changing_the_password_signs_the_other_devices_out(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    other = await sign_in_again(runtime, account.user_id, user_agent=IPHONE_SAFARI)
    response = await client.post(
        "/api/v1/me/password",
        headers=account.headers,
        json={"current_password": PASSWORD, "new_password": "baobab-shade-at-noon-2031"},
    )
    assert response.status_code == 204, response.text
    assert (await client.get("/api/v1/me", headers=account.headers)).status_code == 200
    assert (await client.get("/api/v1/me", headers=bearer(other))).status_code == 401
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, account.user_id)
        assert user is not None
        hasher = password_hasher(runtime)
        assert (await hasher.verify("baobab-shade-at-noon-2031", user.password_hash))[0]
        assert not (await hasher.verify(PASSWORD, user.password_hash))[0]


async def test_changing_the_password_needs_the_current_one(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    other = await sign_in_again(runtime, account.user_id)
    response = await client.post(
        "/api/v1/me/password",
        headers=account.headers,
        json={"current_password": "not-my-password-at-all", "new_password": "baobab-shade-2031"},
    )
    assert response.status_code == 403
    assert response.json()["type"] == "/problems/wrong-current-password"
    assert (await client.get("/api/v1/me", headers=bearer(other))).status_code == 200
    async with runtime.db.transaction(read_only=True) as session:
        live = (
            await session.scalars(
                select(AuthSession).where(
                    AuthSession.user_id == account.user_id, AuthSession.revoked_at.is_(None)
                )
            )
        ).all()
    assert len(live) == 2


async def test_a_password_change_cannot_set_other_fields(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    response = await client.post(
        "/api/v1/me/password",
        headers=account.headers,
        json={
            "current_password": PASSWORD,
            "new_password": "baobab-shade-at-noon-2031",
            "keep_session_id": None,
        },
    )
    assert response.status_code == 422
