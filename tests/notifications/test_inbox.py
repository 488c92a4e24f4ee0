"""In-app notifications over HTTP (list, unread, mark read), their realtime push, and a
user's preferences; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import httpx2
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.models import Role
from soko.notifications.inbox import add_to_inbox, user_channel
from soko.notifications.models import InboxNotification
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser, SignedInUser, make_user  # noqa: F401
from tests.notifications.support import no_scheduled_jobs, transaction  # noqa: F401

API = "/api/v1"
ME = f"{API}/me/notifications"
PREFS = f"{API}/me/notification-preferences"


async def _add_in(
    session: AsyncSession, runtime: Runtime, user: SignedInUser, title: str, **extra: object
) -> uuid.UUID | None:
    return await add_to_inbox(
        session,
        pubsub=runtime.pubsub,
        user_id=user.user_id,
        category="transactional",
        title=title,
        body=f"{title} body",
        **extra,  # type: ignore[arg-type]
    )


async def _add(runtime: Runtime, user: SignedInUser, title: str, **extra: object) -> uuid.UUID:
    async with transaction(runtime) as session:
        added = await _add_in(session, runtime, user, title, **extra)
    assert added is not None
    return added


async def _titles(runtime: Runtime, user: SignedInUser) -> list[str]:
    async with transaction(runtime) as session:
        rows = await session.scalars(
            select(InboxNotification.title).where(InboxNotification.user_id == user.user_id)
        )
        return list(rows.all())


async def test_listing_pages_newest_first_and_filters_unread(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
    clock: ManualClock,
) -> None:
    me = await make_user()
    other = await make_user()
    for n in range(5):
        await _add(runtime, me, f"n{n}")
        clock.advance(dt.timedelta(seconds=1))
    await _add(runtime, other, "not yours")

    first = (await client.get(ME, params={"limit": 2}, headers=me.headers)).json()
    assert [item["title"] for item in first["items"]] == ["n4", "n3"]
    second = (
        await client.get(
            ME, params={"limit": 2, "cursor": first["next_cursor"]}, headers=me.headers
        )
    ).json()
    third = (
        await client.get(
            ME, params={"limit": 2, "cursor": second["next_cursor"]}, headers=me.headers
        )
    ).json()
    assert [i["title"] for i in second["items"] + third["items"]] == ["n2", "n1", "n0"]
    assert third["next_cursor"] is None
    # A cursor from one user's list does not page another's.
    stolen = await client.get(
        ME, params={"limit": 2, "cursor": first["next_cursor"]}, headers=other.headers
    )
    assert stolen.status_code == 400 or stolen.status_code == 422

    assert (await client.get(f"{ME}/unread-count", headers=me.headers)).json() == {"unread": 5}
    n3 = first["items"][1]["id"]
    assert (await client.post(f"{ME}/{n3}/read", headers=me.headers)).status_code == 204
    assert (await client.post(f"{ME}/{n3}/read", headers=me.headers)).status_code == 204
    unread = (await client.get(ME, params={"unread": "true"}, headers=me.headers)).json()
    assert [item["title"] for item in unread["items"]] == ["n4", "n2", "n1", "n0"]
    read = next(i for i in first["items"] if i["id"] == n3)
    assert read["read_at"] is None  # the first page was taken before
    assert (await client.get(f"{ME}/unread-count", headers=me.headers)).json() == {"unread": 4}

    # Someone else's notification is not found, like a missing one.
    theirs = (await client.get(ME, headers=other.headers)).json()["items"][0]["id"]
    assert (await client.post(f"{ME}/{theirs}/read", headers=me.headers)).status_code == 404
    assert (await client.post(f"{ME}/{uuid.uuid4()}/read", headers=me.headers)).status_code == 404
    assert (await client.get(f"{ME}/unread-count", headers=other.headers)).json() == {"unread": 1}


async def test_mark_all_read_up_to_an_id(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    me = await make_user()
    ids = [await _add(runtime, me, f"n{n}") for n in range(3)]
    answer = await client.post(f"{ME}/read", json={"up_to_id": str(ids[1])}, headers=me.headers)
    assert answer.json() == {"marked": 2}
    assert (await client.get(f"{ME}/unread-count", headers=me.headers)).json() == {"unread": 1}
    answer = await client.post(f"{ME}/read", json={}, headers=me.headers)
    assert answer.json() == {"marked": 1}
    assert (
        await client.post(f"{ME}/read", json={"everything": True}, headers=me.headers)
    ).status_code == 422


async def test_the_same_dedupe_key_stores_one_notification(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    me = await make_user()
    await _add(runtime, me, "once", dedupe_key="event-1")
    async with transaction(runtime) as session:
        again = await _add_in(session, runtime, me, "twice", dedupe_key="event-1")
    assert again is None
    assert (await client.get(f"{ME}/unread-count", headers=me.headers)).json() == {"unread": 1}


async def test_a_new_notification_is_pushed_on_the_users_channel(
    runtime: Runtime,
    make_user: MakeUser,  # noqa: F811
) -> None:
    me = await make_user()
    await _add(runtime, me, "an earlier one")
    async with runtime.pubsub.subscribe(user_channel(me.user_id)) as messages:
        added = await _add(runtime, me, "Order SK-1 is paid")
        # Pushed once the transaction committed, with no job in between.
        message = await asyncio.wait_for(anext(aiter(messages)), timeout=5)
    assert message.data["type"] == "notification"
    assert message.data["id"] == str(added) and message.data["title"] == "Order SK-1 is paid"
    assert message.data["unread_count"] == 2
    assert await runtime.dispatcher.run_until_idle() == 0


async def test_the_pushed_unread_count_counts_this_transactions_notifications_too(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    me = await make_user()
    await _add(runtime, me, "read already")
    assert (await client.post(f"{ME}/read", json={}, headers=me.headers)).json() == {"marked": 1}
    await _add(runtime, me, "still unread")
    async with runtime.pubsub.subscribe(user_channel(me.user_id)) as messages:
        async with transaction(runtime) as session:
            first = await _add_in(session, runtime, me, "first of two", dedupe_key="e-2")
            second = await _add_in(session, runtime, me, "second of two", dedupe_key="e-3")
            assert await _add_in(session, runtime, me, "again", dedupe_key="e-3") is None
        received = [await asyncio.wait_for(anext(aiter(messages)), timeout=5) for _ in range(2)]
    pushed = {message.data["id"]: message.data["unread_count"] for message in received}
    assert pushed == {str(first): 2, str(second): 3}
    assert (await client.get(f"{ME}/unread-count", headers=me.headers)).json() == {"unread": 3}


async def test_a_notification_rolled_back_is_never_pushed(
    runtime: Runtime,
    make_user: MakeUser,  # noqa: F811
) -> None:
    me = await make_user()
    channel = user_channel(me.user_id)
    async with runtime.pubsub.subscribe(channel) as messages:
        with pytest.raises(RuntimeError):
            async with transaction(runtime) as session:
                await _add_in(session, runtime, me, "never stored")
                raise RuntimeError("the handler failed after adding it")
        await asyncio.sleep(0.05)  # room for a wrongly started publish to arrive first
        await runtime.pubsub.publish(channel, {"type": "marker"})
        first = await asyncio.wait_for(anext(aiter(messages)), timeout=5)
    assert first.data == {"type": "marker"}
    assert (await _titles(runtime, me)) == []


async def test_routes_need_a_signed_in_user(client: httpx2.AsyncClient) -> None:
    for method, path in [
        ("GET", ME),
        ("GET", f"{ME}/unread-count"),
        ("POST", f"{ME}/{uuid.uuid4()}/read"),
        ("POST", f"{ME}/read"),
        ("GET", PREFS),
        ("PUT", PREFS),
    ]:
        assert (await client.request(method, path, json={})).status_code == 401


# -- preferences -------------------------------------------------------------------------------


async def test_preferences_default_to_everything_and_locked_ones_stay_on(
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    me = await make_user()
    prefs = (await client.get(PREFS, headers=me.headers)).json()
    assert prefs["locale"] == "en"
    assert set(prefs["categories"]) == {"security", "transactional", "updates", "marketing"}
    assert prefs["categories"]["security"] == {
        "channels": {"email": True, "sms": True, "in_app": True},
        "can_switch_off": False,
    }
    refused = await client.put(
        PREFS,
        json={"categories": {"security": {"email": True, "sms": False, "in_app": True}}},
        headers=me.headers,
    )
    assert refused.status_code == 422
    assert refused.json()["type"] == "/problems/notification-preference-locked"
    assert refused.json()["category"] == "security"

    changed = await client.put(
        PREFS,
        json={
            "locale": "sw",
            "categories": {
                "marketing": {"email": False, "sms": False, "in_app": False},
                "updates": {"email": False, "sms": True, "in_app": True},
            },
        },
        headers=me.headers,
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["locale"] == "sw"
    assert body["categories"]["marketing"]["channels"] == {
        "email": False,
        "sms": False,
        "in_app": False,
    }
    assert body["categories"]["updates"]["channels"]["email"] is False
    # Sent again, it replaces; other users keep their defaults.
    again = await client.put(
        PREFS,
        json={"categories": {"updates": {"email": True, "sms": True, "in_app": True}}},
        headers=me.headers,
    )
    assert again.json()["categories"]["updates"]["channels"]["email"] is True
    assert again.json()["categories"]["marketing"]["channels"]["email"] is False
    other = await make_user()
    assert (await client.get(PREFS, headers=other.headers)).json()["categories"]["marketing"][
        "channels"
    ]["email"] is True
    bad = await client.put(PREFS, json={"locale": "fr"}, headers=me.headers)
    assert bad.status_code == 422


async def test_a_switched_off_category_sends_nothing_on_that_channel(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    from soko.notifications.preferences import Category, ChannelName, allowed_channels

    me = await make_user(Role.customer)
    await client.put(
        PREFS,
        json={"categories": {"updates": {"email": False, "sms": True, "in_app": True}}},
        headers=me.headers,
    )
    async with runtime.db.sessionmaker() as session:
        updates = await allowed_channels(session, me.user_id, Category.updates)
        transactional = await allowed_channels(session, me.user_id, Category.transactional)
    assert updates == {ChannelName.sms, ChannelName.in_app}
    assert transactional == set(ChannelName)


@pytest.mark.parametrize("unread", ["maybe", "2"])
async def test_a_bad_unread_flag_is_a_validation_problem(
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
    unread: str,
) -> None:
    me = await make_user()
    answer = await client.get(ME, params={"unread": unread}, headers=me.headers)
    assert answer.status_code == 422
