"""Deliveries end to end: real events, a real receiver on 127.0.0.1, signatures checked
with the official ``standardwebhooks`` package, the retry schedule on a manual clock,
disabling and the owner's email, order per endpoint, redelivery, and the address guard
at send time."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from soko.identity.models import Role
from soko.notifications.public import read_sink
from soko.platform.clock import ManualClock
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from soko.webhooks.delivery import RESOLVER_EXTENSION, RETRY_SCHEDULE, people_to_tell
from soko.webhooks.models import WebhookEndpoint
from tests.cart.catalog_support import Market, Shop
from tests.identity.conftest import MakeUser
from tests.orders.conftest import MakeBuyer, ok, pay, problem_type, sign_in_again
from tests.webhooks.conftest import (
    Hooks,
    attempts,
    deliveries,
    endpoint_row,
    order_payload,
    publish_event,
    run_jobs,
)
from tests.webhooks.receiver import Receiver, counting_listener, running_receiver

ShopHooks = Callable[[], Awaitable[tuple[Shop, Hooks]]]
relaxed_guard = pytest.mark.parametrize("allow_private_addresses", [True])
PAYMENTS_EVENTS = importlib.util.find_spec("soko.payments.events") is not None


def verified(secret: str, request: Any) -> dict[str, Any]:
    """The envelope, once the official library accepts its signature."""
    payload: dict[str, Any] = Webhook(secret).verify(request.body, request.headers)
    return payload


def types(receiver: Receiver) -> list[str]:
    return [json.loads(request.body)["type"] for request in receiver.requests]


@relaxed_guard
async def test_a_stores_endpoint_receives_its_orders_signed(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    market: Market,
    make_buyer: MakeBuyer,
    admin_hooks: Hooks,
    receiver: Receiver,
) -> None:
    shop = await market.open_shop()
    hooks = Hooks(client, shop.headers)
    endpoint = await hooks.create(receiver.url, "order.placed", "order.paid")
    other_shop = await market.open_shop()
    with running_receiver() as other_receiver, running_receiver() as marketplace_receiver:
        await Hooks(client, other_shop.headers).create(
            other_receiver.url, "order.placed", "order.paid"
        )
        marketplace = await admin_hooks.create(marketplace_receiver.url, "order.placed")

        variant_id = (await shop.list_product(1500, stock=5)).variant_id
        buyer = await make_buyer((variant_id, 2))
        group = await buyer.checkout()
        order_id = group["orders"][0]["id"]
        assert await pay(runtime, uuid.UUID(group["id"]))
        await run_jobs(runtime)

        assert types(receiver) == ["order.placed", "order.paid"]
        envelopes = [verified(endpoint["secret"], request) for request in receiver.requests]
        for envelope, request in zip(envelopes, receiver.requests, strict=True):
            assert set(envelope) == {"id", "type", "created_at", "data"}
            assert request.headers["webhook-id"] == f"evt_{uuid.UUID(envelope['id']).hex}"
            assert envelope["data"]["order_id"] == order_id
            assert envelope["data"]["seller_id"] == str(shop.seller_id)
            assert request.headers["content-type"] == "application/json"
        assert envelopes[0]["data"]["subtotal_minor"] == 3000
        # A wrong secret or a changed body is not accepted by the receiver's library.
        with pytest.raises(WebhookVerificationError):
            verified(marketplace["secret"], receiver.requests[0])

        # Another store hears nothing of this order; the marketplace hears what it chose.
        assert other_receiver.requests == []
        assert types(marketplace_receiver) == ["order.placed"]
        verified(marketplace["secret"], marketplace_receiver.requests[0])

    log = ok(await hooks.get(f"/{endpoint['id']}/attempts"))["items"]
    assert sorted((line["event_type"], line["status_code"]) for line in log) == [
        ("order.paid", 200),
        ("order.placed", 200),
    ]
    line = log[0]
    assert line["succeeded"] and line["attempt"] == 1 and line["error"] is None
    assert line["duration_ms"] >= 0 and line["response_excerpt"] == "ok"
    sent_ids = {request.headers["x-request-id"] for request in receiver.requests}
    assert {line["id"] for line in log} == sent_ids
    delivered = ok(await hooks.get(f"/{endpoint['id']}/deliveries"))["items"]
    assert {item["status"] for item in delivered} == {"succeeded"}


@relaxed_guard
async def test_a_failing_endpoint_is_retried_on_schedule_then_disabled_and_its_owner_told(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    shop_hooks: ShopHooks,
) -> None:
    shop, hooks = await shop_hooks()
    with running_receiver(default_status=500, answer_body=b"e" * 50_000) as failing:
        endpoint = await hooks.create(failing.url, "order.processing", "order.shipped")
        first = await publish_event(runtime, "order.processing", order_payload(shop.seller_id))
        second = await publish_event(runtime, "order.shipped", order_payload(shop.seller_id))
        started = clock.now()
        await run_jobs(runtime)
        moments = [started]
        for wait in RETRY_SCHEDULE:
            clock.advance(wait - dt.timedelta(seconds=1))
            await run_jobs(runtime)
            assert len(failing.requests) == len(moments), "retried before its time"
            clock.advance(dt.timedelta(seconds=1))
            await run_jobs(runtime)
            moments.append(clock.now())
            assert len(failing.requests) == len(moments), "not retried at its time"
        clock.advance(dt.timedelta(days=2))
        await run_jobs(runtime)
        # Ten attempts of the first event; the second waited behind it the whole time.
        assert len(failing.requests) == len(RETRY_SCHEDULE) + 1 == 10
        assert {r.headers["webhook-id"] for r in failing.requests} == {f"evt_{first.hex}"}
        timestamps = [int(r.headers["webhook-timestamp"]) for r in failing.requests]
        assert timestamps == [int(moment.timestamp()) for moment in moments]

    log = await attempts(runtime, endpoint["id"])
    assert [line.attempt for line in log] == list(range(1, 11))
    assert {(line.status_code, line.succeeded, line.error) for line in log} == {
        (500, False, "HTTP 500")
    }
    assert all(len(line.response_excerpt or "") <= 1000 for line in log)
    row = await endpoint_row(runtime, endpoint["id"])
    assert not row.enabled and row.disabled_reason == "failing for 76 hours with no success"
    assert [(d.event_id, d.status, d.attempts) for d in await deliveries(runtime, row.id)] == [
        (first, "failed", 10),
        (second, "failed", 0),
    ]
    emails = read_sink(runtime.settings.data_dir, "email")
    told = [email for email in emails if email["category"] == "webhooks.endpoint_disabled"]
    assert [email["to"] for email in told] == [shop.owner.email]
    assert str(row.id) in told[0]["text"] and "/hooks" not in told[0]["text"]

    # While disabled, new events do not reach it.
    await publish_event(runtime, "order.shipped", order_payload(shop.seller_id))
    await run_jobs(runtime)
    assert len(await deliveries(runtime, row.id)) == 2

    # The owner fixes the receiver, enables the endpoint and asks for what failed.
    shop.owner = await sign_in_again(runtime, shop.owner)
    hooks.headers = shop.headers
    path = f"/{endpoint['id']}"
    refused = await hooks.post(f"{path}/redeliver-failed", {"since": started.isoformat()})
    assert (refused.status_code, problem_type(refused)) == (409, "webhook-endpoint-disabled")
    assert ok(await hooks.patch(path, {"enabled": True}))["enabled"] is True
    with running_receiver() as fixed:
        await hooks.patch(path, {"url": fixed.url})
        answer = ok(
            await hooks.post(f"{path}/redeliver-failed", {"since": started.isoformat()}), 202
        )
        assert answer == {"requeued": 2, "more": False}
        await run_jobs(runtime)
        assert [r.headers["webhook-id"] for r in fixed.requests] == [
            f"evt_{first.hex}",
            f"evt_{second.hex}",
        ]
    assert {d.status for d in await deliveries(runtime, row.id)} == {"succeeded"}
    manual = [line for line in await attempts(runtime, row.id) if line.cause == "manual"]
    assert len(manual) == 1  # the second event had never been attempted


@relaxed_guard
async def test_an_endpoint_gets_its_events_in_order_while_one_is_retried(
    runtime: Runtime, clock: ManualClock, shop_hooks: ShopHooks
) -> None:
    shop, hooks = await shop_hooks()
    with running_receiver(statuses=[503]) as receiver:
        endpoint = await hooks.create(receiver.url, "order.processing")
        events = [
            await publish_event(
                runtime, "order.processing", order_payload(shop.seller_id, number=f"SK-{n}")
            )
            for n in range(3)
        ]
        await run_jobs(runtime)
        assert [r.headers["webhook-id"] for r in receiver.requests] == [f"evt_{events[0].hex}"]
        clock.advance(RETRY_SCHEDULE[0])
        await run_jobs(runtime)
        assert [r.headers["webhook-id"] for r in receiver.requests] == [
            f"evt_{events[0].hex}",
            f"evt_{events[0].hex}",
            f"evt_{events[1].hex}",
            f"evt_{events[2].hex}",
        ]
        for request in receiver.requests:
            verified(endpoint["secret"], request)
    row = await endpoint_row(runtime, endpoint["id"])
    assert row.enabled and row.failing_since is None and row.last_success_at == clock.now()


@relaxed_guard
async def test_redelivery_sends_the_same_webhook_id_again(
    runtime: Runtime, shop_hooks: ShopHooks, receiver: Receiver
) -> None:
    shop, hooks = await shop_hooks()
    endpoint = await hooks.create(receiver.url, "order.delivered")
    event = await publish_event(runtime, "order.delivered", order_payload(shop.seller_id))
    await run_jobs(runtime)
    [delivery] = ok(await hooks.get(f"/{endpoint['id']}/deliveries"))["items"]
    assert delivery["webhook_id"] == f"evt_{event.hex}" and delivery["status"] == "succeeded"
    redo = await hooks.post(f"/{endpoint['id']}/deliveries/{delivery['id']}/redeliver")
    assert ok(redo, 202)["status"] == "pending"
    await run_jobs(runtime)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [f"evt_{event.hex}"] * 2
    assert receiver.requests[0].body == receiver.requests[1].body
    log = ok(await hooks.get(f"/{endpoint['id']}/attempts"))["items"]
    assert [(line["attempt"], line["cause"]) for line in log] == [(2, "manual"), (1, "scheduled")]
    missing = await hooks.post(f"/{endpoint['id']}/deliveries/{uuid.uuid4()}/redeliver")
    assert missing.status_code == 404


@relaxed_guard
async def test_a_rotated_secret_signs_beside_the_new_one_for_the_overlap(
    runtime: Runtime, clock: ManualClock, shop_hooks: ShopHooks, receiver: Receiver
) -> None:
    shop, hooks = await shop_hooks()
    endpoint = await hooks.create(receiver.url, "order.completed")
    new_secret = ok(await hooks.post(f"/{endpoint['id']}/rotate-secret"))["secret"]
    await publish_event(runtime, "order.completed", order_payload(shop.seller_id))
    await run_jobs(runtime)
    [during] = receiver.requests
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    verified(endpoint["secret"], during)
    verified(new_secret, during)

    clock.advance(dt.timedelta(hours=runtime.settings.webhooks_secret_overlap_hours, seconds=1))
    await publish_event(runtime, "order.completed", order_payload(shop.seller_id))
    await run_jobs(runtime)
    after = receiver.requests[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert after.headers["webhook-signature"].startswith("v1,")


@pytest.mark.skipif(
    not PAYMENTS_EVENTS, reason="the payments domain publishes no events in this build"
)
@relaxed_guard
async def test_a_payment_reaches_each_store_narrowed_to_itself(
    runtime: Runtime, shop_hooks: ShopHooks, admin_hooks: Hooks
) -> None:
    shop_a, hooks_a = await shop_hooks()
    shop_b, hooks_b = await shop_hooks()
    with (
        running_receiver() as receiver_a,
        running_receiver() as receiver_b,
        running_receiver() as receiver_m,
    ):
        await hooks_a.create(receiver_a.url, "payment.succeeded")
        await hooks_b.create(receiver_b.url, "payment.succeeded")
        await admin_hooks.create(receiver_m.url, "payment.succeeded")
        sellers = [str(shop_a.seller_id), str(shop_b.seller_id)]
        await publish_event(
            runtime,
            "payment.succeeded",
            {
                "payment_id": str(uuid.uuid4()),
                "group_id": str(uuid.uuid4()),
                "buyer_id": str(uuid.uuid4()),
                "seller_ids": sellers,
                "provider": "sandbox",
                "amount_minor": 5000,
                "currency": "KES",
                "status": "succeeded",
            },
        )
        await run_jobs(runtime)
        seen = {
            name: [json.loads(r.body)["data"]["seller_ids"] for r in receiver.requests]
            for name, receiver in (("a", receiver_a), ("b", receiver_b), ("m", receiver_m))
        }
    assert seen == {"a": [[sellers[0]]], "b": [[sellers[1]]], "m": [sellers]}


async def test_a_blocked_address_is_never_connected_to(
    runtime: Runtime, shop_hooks: ShopHooks
) -> None:
    """The guard is on. The URL names a host that passes registration but resolves, at
    send time, to loopback (DNS rebinding): nothing reaches the listener."""
    shop, hooks = await shop_hooks()
    with counting_listener() as listener:

        async def rebinding(host: str, port: int) -> list[str]:
            return ["127.0.0.1"] if host == "hooks.rebind.example" else []

        runtime.extensions[RESOLVER_EXTENSION] = rebinding
        endpoint = await hooks.create(
            f"http://hooks.rebind.example:{listener.port}/in", "order.processing"
        )
        await publish_event(runtime, "order.processing", order_payload(shop.seller_id))
        await run_jobs(runtime)
        [line] = await attempts(runtime, endpoint["id"])
        assert line.status_code is None and not line.succeeded
        assert line.error == "refused: the host resolves to a loopback address"
        [delivery] = await deliveries(runtime, endpoint["id"])
        assert (delivery.status, delivery.attempts) == ("pending", 1)
        assert listener.connections == 0


@relaxed_guard
async def test_secrets_never_reach_logs_or_the_outbox(
    runtime: Runtime,
    shop_hooks: ShopHooks,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    shop, hooks = await shop_hooks()
    endpoint = await hooks.create(receiver.url, "order.completed")
    rotated = ok(await hooks.post(f"/{endpoint['id']}/rotate-secret"))["secret"]
    await publish_event(runtime, "order.completed", order_payload(shop.seller_id))
    await run_jobs(runtime)
    assert len(receiver.requests) == 1
    captured = capsys.readouterr()
    async with runtime.db.transaction(read_only=True) as session:
        payloads = (await session.scalars(select(OutboxMessage.payload))).all()
    for secret in (endpoint["secret"], rotated):
        for text in (captured.out, captured.err, caplog.text, json.dumps(payloads)):
            assert secret not in text
            assert secret.removeprefix("whsec_") not in text


async def test_the_marketplaces_disabled_endpoint_is_told_to_every_admin(
    runtime: Runtime, admin_hooks: Hooks, make_user: MakeUser
) -> None:
    other_admin = await make_user(Role.admin)
    endpoint = await admin_hooks.create("https://hooks.example.com/in", "order.paid")
    async with runtime.db.transaction() as session:
        row = await session.get(WebhookEndpoint, uuid.UUID(endpoint["id"]))
        assert row is not None
        told = await people_to_tell(session, row)
    assert told[0] == row.created_by
    assert set(told) == {row.created_by, other_admin.user_id}
