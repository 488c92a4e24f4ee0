"""Domain events to messages: the declared trigger table, and a demo order placed and
paid reaching the buyer and the seller by email, SMS and in-app, on SQLite and
PostgreSQL. (Payments may not publish yet: the order is paid through
soko.orders.public.mark_group_paid, which publishes order.paid as a payment will.)"""

from __future__ import annotations

import uuid
from typing import Any

import httpx2

from soko.identity.accounts import create_user
from soko.identity.models import Role
from soko.identity.sessions import start_session
from soko.notifications.preferences import LOCKED, ChannelName
from soko.notifications.public import read_sink
from soko.notifications.templates import (
    LOCALES,
    SAMPLE_CONTEXT,
    bundled_source,
    render_source,
    template_names,
)
from soko.notifications.triggers import TRIGGERS, Audience
from soko.orders import events as order_events
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from soko.sellers import events as seller_events
from soko.sellers.public import seller_cards
from tests.cart.catalog_support import Market, market  # noqa: F401
from tests.conftest import sql_statements
from tests.identity.conftest import TEST_DEVICE, MakeUser, SignedInUser, make_user  # noqa: F401
from tests.notifications.support import no_scheduled_jobs  # noqa: F401
from tests.orders.conftest import API, Buyer, ok, pay
from tests.sellers.conftest import join_store

ME = f"{API}/me/notifications"


def test_every_event_of_the_issue_has_its_audiences() -> None:
    declared = {(trigger.event, trigger.audience) for trigger in TRIGGERS}
    expected = {
        (order_events.ORDER_PLACED, Audience.buyer),
        (order_events.ORDER_PLACED, Audience.seller),
        (order_events.ORDER_PAID, Audience.buyer),
        (order_events.ORDER_PAID, Audience.seller),
        (order_events.ORDER_SHIPPED, Audience.buyer),
        (order_events.ORDER_DELIVERED, Audience.buyer),
        (order_events.ORDER_DELIVERED, Audience.seller),
        (order_events.ORDER_CANCELLED, Audience.buyer),
        (order_events.ORDER_CANCELLED, Audience.seller),
        (order_events.ORDER_EXPIRED, Audience.buyer),
        (order_events.ORDER_REFUNDED, Audience.buyer),
        (order_events.ORDER_REFUNDED, Audience.seller),
        (order_events.DISPUTE_OPENED, Audience.seller),
        (order_events.DISPUTE_OPENED, Audience.admins),
        (order_events.DISPUTE_ANSWERED, Audience.buyer),
        (order_events.DISPUTE_ANSWERED, Audience.admins),
        (order_events.DISPUTE_RESOLVED, Audience.buyer),
        (order_events.DISPUTE_RESOLVED, Audience.seller),
        (seller_events.SELLER_APPROVED, Audience.seller),
        (seller_events.SELLER_SUSPENDED, Audience.seller),
        ("payment.succeeded", Audience.buyer),
        ("refund.succeeded", Audience.buyer),
        ("identity.new_device_sign_in", Audience.account),
    }
    assert declared == expected
    assert len(declared) == len(TRIGGERS)  # one row per (event, audience)


def test_every_trigger_has_a_template_that_renders_in_every_locale() -> None:
    names = set(template_names())
    for trigger in TRIGGERS:
        assert trigger.template in names, trigger
        assert trigger.channels, trigger
        for locale in LOCALES:
            source = bundled_source(trigger.template, locale)
            assert source is not None, (trigger.template, locale)
            rendered = render_source(source, SAMPLE_CONTEXT)
            if ChannelName.sms in trigger.channels:
                assert rendered.sms, f"{trigger.template} sends SMS but has no sms block"
    # Money and the orders' events are never optional; the admins get email and in-app.
    for trigger in TRIGGERS:
        if trigger.event.startswith(("order.placed", "order.paid", "payment.", "refund.")):
            assert trigger.category in LOCKED
        if trigger.audience is Audience.admins:
            assert trigger.channels == {ChannelName.email, ChannelName.in_app}
    assert names == {trigger.template for trigger in TRIGGERS}


def test_swahili_differs_from_english() -> None:
    english = render_source(bundled_source("order.paid.buyer", "en") or "", SAMPLE_CONTEXT)
    swahili = render_source(bundled_source("order.paid.buyer", "sw") or "", SAMPLE_CONTEXT)
    assert "imelipwa" in swahili.subject and english.subject != swahili.subject
    assert "KES 2,500.00" in english.text and "KES 2,500.00" in swahili.sms


async def _user(
    runtime: Runtime,
    *,
    phone: str | None = None,
    role: Role = Role.customer,
    name: str = "",
    email_verified: bool = True,
) -> SignedInUser:
    email = f"user-{uuid.uuid4().hex[:10]}@example.com"
    async with runtime.db.transaction() as session:
        user = await create_user(
            session,
            runtime.data_keys,
            now=runtime.clock.now(),
            email=email,
            phone=phone,
            display_name=name,
            roles=(role,),
            email_verified=email_verified,
            phone_verified=phone is not None,
        )
        tokens = await start_session(session, runtime, user, method="test", device=TEST_DEVICE)
    return SignedInUser(user_id=user.id, email=email, tokens=tokens)


def _by_category(records: list[dict[str, Any]], category: str) -> list[dict[str, Any]]:
    return [record for record in records if record["category"] == category]


async def test_placing_and_paying_an_order_reaches_the_buyer_and_the_seller(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    market: Market,  # noqa: F811
    clock: ManualClock,
) -> None:
    owner = await _user(runtime, phone="+254711000001", name="Mama Duka")
    shop = await market.open_shop(owner)
    async with runtime.db.sessionmaker() as session:
        shop_name = (await seller_cards(session, [shop.seller_id]))[shop.seller_id].store_name
    variant_id = (await shop.list_product(1500, stock=10)).variant_id
    buyer_user = await _user(runtime, phone="+254722000002", name="Wanjiku")
    cart = ok(await client.post(f"{API}/carts", headers=buyer_user.headers), 200, 201)
    buyer = Buyer(client, buyer_user, uuid.UUID(cart["cart"]["id"]))
    await buyer.add(variant_id, 2)
    group = await buyer.checkout()
    number = group["orders"][0]["number"]
    await runtime.dispatcher.run_until_idle()

    data_dir = runtime.settings.data_dir
    emails = read_sink(data_dir, "email")
    [placed_buyer] = _by_category(emails, "transactional.order.placed.buyer")
    [placed_seller] = _by_category(emails, "transactional.order.placed.seller")
    assert placed_buyer["to"] == buyer_user.email and placed_seller["to"] == owner.email
    assert number in placed_buyer["subject"] and "Wanjiku" in placed_buyer["text"]
    assert "KES 30.00" in placed_buyer["text"]  # 2 x 15.00
    app_url = runtime.settings.effective_app_url
    assert f'{app_url}/orders/{group["orders"][0]["id"]}"' in placed_buyer["html"]
    assert _by_category(read_sink(data_dir, "sms"), "transactional.order.placed.buyer") == []

    assert await pay(runtime, uuid.UUID(group["id"]))
    await runtime.dispatcher.run_until_idle()
    emails = read_sink(data_dir, "email")
    sms = read_sink(data_dir, "sms")
    [paid_buyer] = _by_category(emails, "transactional.order.paid.buyer")
    [paid_seller] = _by_category(emails, "transactional.order.paid.seller")
    assert paid_buyer["to"] == buyer_user.email and paid_seller["to"] == owner.email
    [sms_buyer] = _by_category(sms, "transactional.order.paid.buyer")
    [sms_seller] = _by_category(sms, "transactional.order.paid.seller")
    assert sms_buyer["to"] == "+254722000002" and number in sms_buyer["body"]
    assert sms_seller["to"] == "+254711000001"

    # In-app, newest first, for each of them alone.
    mine = ok(await client.get(ME, headers=buyer_user.headers))
    assert [item["title"] for item in mine["items"]] == [
        f"Order {number} is paid",
        f"We received your order {number}",
    ]
    assert mine["items"][0]["data"]["order_id"] == group["orders"][0]["id"]
    seller_view = ok(await client.get(ME, headers=owner.headers))
    titles = [item["title"] for item in seller_view["items"]]
    # The approval and the order were handled in one run of the outbox, in any order.
    assert titles[0] == f"Order {number} is paid: ship it"
    assert set(titles[1:]) == {f"New order {number}", f"Your store {shop_name} is approved"}
    count = ok(await client.get(f"{ME}/unread-count", headers=buyer_user.headers))
    assert count == {"unread": 2}

    # A second run of the same events sends nothing more.
    before = (len(read_sink(data_dir, "email")), len(read_sink(data_dir, "sms")))
    assert await runtime.dispatcher.run_until_idle() == 0
    assert (len(read_sink(data_dir, "email")), len(read_sink(data_dir, "sms"))) == before


async def test_an_unverified_address_gets_no_message_only_the_inbox(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    market: Market,  # noqa: F811
) -> None:
    """Anyone can sign up with someone else's email: until its owner proves it theirs,
    the marketplace mails it nothing. This account signed in by SMS (its number is
    verified, so it may check out) and gave an email it never verified: its orders'
    news reaches the number and the app, never the email."""
    shop = await market.open_shop(await _user(runtime, name="Mama Duka"))
    variant_id = (await shop.list_product(1500, stock=10)).variant_id
    stranger = await _user(runtime, phone="+254722000009", email_verified=False)
    cart = ok(await client.post(f"{API}/carts", headers=stranger.headers), 200, 201)
    buyer = Buyer(client, stranger, uuid.UUID(cart["cart"]["id"]))
    await buyer.add(variant_id, 1)
    group = await buyer.checkout()
    assert await pay(runtime, uuid.UUID(group["id"]))
    await runtime.dispatcher.run_until_idle()

    data_dir = runtime.settings.data_dir
    assert [e for e in read_sink(data_dir, "email") if e["to"] == stranger.email] == []
    texts = [t for t in read_sink(data_dir, "sms") if t["to"] == "+254722000009"]
    assert [t["category"] for t in texts] == ["transactional.order.paid.buyer"]
    mine = ok(await client.get(ME, headers=stranger.headers))
    assert len(mine["items"]) == 2  # placed and paid, in the app
    # The seller, verified, heard of it by email.
    assert _by_category(read_sink(data_dir, "email"), "transactional.order.placed.seller")


async def test_messages_are_in_the_buyers_language(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    market: Market,  # noqa: F811
) -> None:
    shop = await market.open_shop()
    variant_id = (await shop.list_product(1000, stock=5)).variant_id
    buyer_user = await _user(runtime, name="Juma")
    ok(
        await client.put(
            f"{API}/me/notification-preferences",
            json={"locale": "sw"},
            headers=buyer_user.headers,
        )
    )
    cart = ok(await client.post(f"{API}/carts", headers=buyer_user.headers), 200, 201)
    buyer = Buyer(client, buyer_user, uuid.UUID(cart["cart"]["id"]))
    await buyer.add(variant_id, 1)
    group = await buyer.checkout()
    await runtime.dispatcher.run_until_idle()
    [email] = _by_category(
        read_sink(runtime.settings.data_dir, "email"), "transactional.order.placed.buyer"
    )
    assert email["subject"].startswith("Tumepokea oda yako")
    assert email["text"].startswith("Habari Juma")
    assert group["orders"][0]["number"] in email["subject"]


async def test_a_sign_in_from_a_new_device_warns_the_account(
    runtime: Runtime, client: httpx2.AsyncClient
) -> None:
    """Identity does not publish this event yet; the trigger is ready for it."""
    from soko.platform.outbox import publish

    user = await _user(runtime, phone="+254733000003", name="Achieng")
    async with runtime.db.transaction() as session:
        await publish(
            session,
            "identity.new_device_sign_in",
            {"user_id": str(user.user_id), "device": "Firefox on Linux", "at": "2030-01-01T08:30Z"},
        )
    await runtime.dispatcher.run_until_idle()
    emails = _by_category(
        read_sink(runtime.settings.data_dir, "email"),
        "security.identity.new_device_sign_in.account",
    )
    assert [email["to"] for email in emails] == [user.email]
    assert "Firefox on Linux" in emails[0]["text"]
    assert _by_category(read_sink(runtime.settings.data_dir, "sms"), emails[0]["category"]) == []
    mine = ok(await client.get(ME, headers=user.headers))
    assert [item["title"] for item in mine["items"]] == ["New sign-in from Firefox on Linux"]
    assert mine["items"][0]["category"] == "security"


async def test_admins_and_the_operations_mailbox_hear_of_a_dispute(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    market: Market,  # noqa: F811
) -> None:
    from soko.platform.outbox import publish

    runtime.settings.notifications_admin_email = "ops@soko.example"
    admin = await _user(runtime, role=Role.admin, name="Baraka")
    owner = await _user(runtime, name="Mama Duka")
    shop = await market.open_shop(owner)
    dispute = {
        "dispute_id": str(uuid.uuid4()),
        "order_id": str(uuid.uuid4()),  # an order the summary does not find: payload facts
        "buyer_id": str(uuid.uuid4()),
        "seller_id": str(shop.seller_id),
        "status": "open",
        "actor_id": None,
        "at": "2030-01-01T08:30:00+00:00",
    }
    for _ in range(2):  # published twice: each event is its own, so each is told once
        async with runtime.db.transaction() as session:
            await publish(session, order_events.DISPUTE_OPENED, dispute)
    await runtime.dispatcher.run_until_idle()
    emails = read_sink(runtime.settings.data_dir, "email")
    admins = _by_category(emails, "transactional.dispute.opened.admins")
    recipients = [email["to"] for email in admins]
    assert recipients.count("ops@soko.example") == 2
    assert recipients.count(admin.email) == 2
    assert dispute["dispute_id"] in admins[0]["text"]
    inbox = ok(await client.get(ME, headers=admin.headers))["items"]
    assert [item["title"].startswith("Dispute opened") for item in inbox] == [True, True]
    sellers = _by_category(emails, "transactional.dispute.opened.seller")
    assert {email["to"] for email in sellers} == {owner.email}
    titles = [item["title"] for item in ok(await client.get(ME, headers=owner.headers))["items"]]
    assert sum(title.startswith("A dispute was opened") for title in titles) == 2


async def test_a_deleted_account_is_forgotten(runtime: Runtime, client: httpx2.AsyncClient) -> None:
    from sqlalchemy import func, select

    from soko.notifications.models import Delivery, InboxNotification, Preference
    from soko.notifications.public import send_email
    from soko.platform.outbox import publish
    from tests.notifications.support import transaction

    user = await _user(runtime, name="Achieng")
    ok(
        await client.put(
            f"{API}/me/notification-preferences",
            json={"locale": "sw", "categories": {"marketing": {"email": False}}},
            headers=user.headers,
        )
    )
    async with transaction(runtime) as session:
        await send_email(
            session, to=user.email, subject="Hi", text="x", category="x.y", user_id=user.user_id
        )
        await publish(
            session,
            "identity.new_device_sign_in",
            {"user_id": str(user.user_id), "device": "Safari", "at": "now"},
        )
    await runtime.dispatcher.run_until_idle()
    async with runtime.db.transaction() as session:
        await publish(session, "identity.user_deleted", {"user_id": str(user.user_id)})
    await runtime.dispatcher.run_until_idle()
    async with runtime.db.sessionmaker() as session:
        for model in (InboxNotification, Preference):
            rows = await session.scalar(
                select(func.count()).select_from(model).where(model.user_id == user.user_id)
            )
            assert rows == 0, model
        kept = await session.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.user_id == user.user_id)
        )
        assert kept == 0
        assert await session.scalar(select(func.count()).select_from(Delivery)) >= 2


async def test_a_stores_whole_staff_hears_of_an_order_with_one_read_of_their_contacts(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    market: Market,  # noqa: F811
) -> None:
    owner = await _user(runtime, name="Owner")
    shop = await market.open_shop(owner)
    acting = {**owner.headers, "X-Seller-Id": str(shop.seller_id)}
    staff = [await _user(runtime, name=f"Staff {n}") for n in range(3)]
    for member in staff:
        await join_store(client, acting, member)
    ok(
        await client.put(
            f"{API}/me/notification-preferences", json={"locale": "sw"}, headers=staff[0].headers
        )
    )
    variant_id = (await shop.list_product(1500, stock=10)).variant_id
    buyer_user = await _user(runtime, name="Wanjiku")
    cart = ok(await client.post(f"{API}/carts", headers=buyer_user.headers), 200, 201)
    buyer = Buyer(client, buyer_user, uuid.UUID(cart["cart"]["id"]))
    await buyer.add(variant_id, 1)
    await runtime.dispatcher.run_until_idle()  # the store's and the cart's own events

    await buyer.checkout()
    with sql_statements(runtime) as sent:
        await runtime.dispatcher.run_until_idle()

    placed = _by_category(
        read_sink(runtime.settings.data_dir, "email"), "transactional.order.placed.seller"
    )
    assert sorted(email["to"] for email in placed) == sorted(
        [owner.email, *(member.email for member in staff)]
    )
    [in_swahili] = [email for email in placed if email["to"] == staff[0].email]
    assert in_swahili["text"].startswith("Habari")
    # Five recipients (the buyer and four members): one read of their contacts and one
    # of their locales, not one of each per recipient.
    contacts = [s for s in sent if "email_ciphertext" in s and "FROM users" in s]
    locales = [s for s in sent if "FROM notifications_locales" in s]
    assert (len(contacts), len(locales)) == (1, 1), sent


async def test_links_in_messages_lead_to_the_app_when_one_is_set(runtime: Runtime) -> None:
    from soko.notifications.triggers import event_context

    async with runtime.db.sessionmaker() as session:
        before = await event_context(session, runtime, "seller.approved", {})
        runtime.settings.app_url = "https://shop.example"
        after = await event_context(session, runtime, "seller.approved", {})
    assert before["app"]["url"] == runtime.settings.public_url
    assert after["app"]["url"] == "https://shop.example"
