"""End to end through the sandbox, on SQLite and PostgreSQL: a buyer checks out, starts a
payment with the sandbox, chooses on its hosted page, and the sandbox's signed webhook
reaches Soko's own inbound route (``/api/v1/payments/webhooks/sandbox``), whose
processing confirms the charge with the sandbox and marks the orders paid."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx2
import pytest
from fastapi import FastAPI
from sqlalchemy import or_, select

from soko.identity.models import Role
from soko.payments.payment_models import Payment, WebhookEvent
from soko.payments.providers.sandbox import SandboxProvider
from soko.payments.sandbox_delivery import TRANSPORT_EXTENSION
from soko.payments.sandbox_models import SandboxCharge, SandboxRefund
from soko.platform.clock import ManualClock
from soko.platform.outbox import MessageStatus, OutboxMessage
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market, market  # noqa: F401
from tests.identity.conftest import MakeUser, make_user  # noqa: F401
from tests.orders.conftest import (  # noqa: F401
    API,
    ORDERS,
    Placed,
    PlaceOrder,
    make_buyer,
    ok,
    place_order,
)
from tests.payments.test_sandbox_support import drain, page_path

FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture
def through_soko(runtime: Runtime, app: FastAPI) -> None:
    """Deliveries go to the app's own inbound route, in process."""
    runtime.extensions[TRANSPORT_EXTENSION] = httpx2.ASGITransport(app=app)


async def _start(client: httpx2.AsyncClient, placed: Placed) -> dict[str, Any]:
    headers = {**placed.buyer.headers, "Idempotency-Key": uuid.uuid4().hex}
    return ok(
        await client.post(
            f"{API}/checkout/{placed.group_id}/payments",
            json={"provider": "sandbox"},
            headers=headers,
        ),
        201,
    )


async def _no_failed_jobs(runtime: Runtime) -> None:
    """Every payments job (processing, deliveries, refunds) ran without an error."""
    async with runtime.db.transaction(read_only=True) as session:
        failed = (
            await session.execute(
                select(OutboxMessage.name, OutboxMessage.status, OutboxMessage.last_error).where(
                    OutboxMessage.name.like("payments.%"),
                    or_(
                        OutboxMessage.status != MessageStatus.done.value,
                        OutboxMessage.last_error.is_not(None),
                    ),
                )
            )
        ).all()
    assert failed == [], failed


async def _orders(client: httpx2.AsyncClient, placed: Placed) -> list[dict[str, Any]]:
    page = ok(await client.get(ORDERS, headers=placed.buyer.headers))
    return [o for o in page["items"] if o["group_id"] == str(placed.group_id)] or [
        o for o in page["items"] if o["id"] == str(placed.order_id)
    ]


async def _events(runtime: Runtime) -> list[WebhookEvent]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = (
            await session.scalars(select(WebhookEvent).where(WebhookEvent.provider == "sandbox"))
        ).all()
        for row in rows:
            session.expunge(row)
    return list(rows)


async def _payment(runtime: Runtime, payment_id: str) -> Payment:
    async with runtime.db.transaction(read_only=True) as session:
        payment = await session.get(Payment, uuid.UUID(payment_id))
        assert payment is not None
        session.expunge(payment)
    return payment


async def _pay_on_the_page(
    client: httpx2.AsyncClient, runtime: Runtime, placed: Placed, **options: str
) -> dict[str, Any]:
    payment = await _start(client, placed)
    assert payment["provider"] == "sandbox"
    assert payment["next_action"]["type"] == "redirect"
    url = payment["next_action"]["url"]
    assert url.startswith(f"{runtime.settings.public_url}/sandbox/pay/")
    await drain(runtime)
    page = await client.get(page_path(url))
    assert page.status_code == 200
    assert payment["id"] in page.text  # the merchant reference is Soko's payment id
    chosen = await client.post(
        page_path(url), content=urlencode({"outcome": "succeeded", **options}), headers=FORM
    )
    assert chosen.status_code in (200, 303), chosen.text
    if chosen.status_code == 303:
        query = parse_qs(urlsplit(chosen.headers["location"]).query)
        assert query["reference"] == [payment["id"]] and query["status"] == ["succeeded"]
    return payment


@pytest.mark.usefixtures("through_soko")
async def test_a_buyer_pays_through_the_sandbox_page_and_sees_the_orders_paid(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    place_order: PlaceOrder,  # noqa: F811
    clock: ManualClock,
) -> None:
    placed = await place_order()
    assert {o["status"] for o in await _orders(client, placed)} == {"pending_payment"}
    payment = await _pay_on_the_page(client, runtime, placed, delay_seconds="2")
    # Not before the chosen delay.
    await drain(runtime)
    assert await _events(runtime) == []
    assert {o["status"] for o in await _orders(client, placed)} == {"pending_payment"}

    clock.advance(2)
    await drain(runtime)
    events = await _events(runtime)
    assert [e.event_type for e in events] == ["charge.succeeded"]
    assert {o["status"] for o in await _orders(client, placed)} == {"paid"}
    stored = await _payment(runtime, payment["id"])
    assert stored.status == "succeeded"
    seen = ok(await client.get(f"{API}/payments/{payment['id']}", headers=placed.buyer.headers))
    assert seen["status"] == "succeeded"
    await _no_failed_jobs(runtime)


@pytest.mark.usefixtures("through_soko")
async def test_duplicates_and_a_stale_pending_have_no_second_effect(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    place_order: PlaceOrder,  # noqa: F811
    clock: ManualClock,
) -> None:
    placed = await place_order()
    payment = await _pay_on_the_page(
        client, runtime, placed, delay_seconds="0", duplicates="2", stale_pending="1"
    )
    # One delivery a second, in order: the event, two copies, then the stale pending.
    for _ in range(4):
        await drain(runtime)
        clock.advance(1)
    await drain(runtime)
    events = await _events(runtime)
    # The copies share the event id and were stored once; the stale one is its own event.
    assert sorted(e.event_type for e in events) == ["charge.pending", "charge.succeeded"]
    assert {o["status"] for o in await _orders(client, placed)} == {"paid"}
    stored = await _payment(runtime, payment["id"])
    assert stored.status == "succeeded"  # the late pending never overwrote it
    await _no_failed_jobs(runtime)


@pytest.mark.usefixtures("through_soko")
async def test_an_admin_refund_goes_through_the_sandbox_and_comes_back_as_a_webhook(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    place_order: PlaceOrder,  # noqa: F811
    make_user: MakeUser,  # noqa: F811
    clock: ManualClock,
) -> None:
    """The refund is sent from a job, inside its transaction (on SQLite, holding the only
    write lock): the sandbox records it and announces it with ``refund.succeeded``."""
    placed = await place_order()
    payment = await _pay_on_the_page(client, runtime, placed, delay_seconds="0")
    await drain(runtime)
    stored = await _payment(runtime, payment["id"])
    assert stored.status == "succeeded"
    admin = await make_user(Role.admin)
    refund = ok(
        await client.post(
            f"{API}/admin/payments/{payment['id']}/refunds",
            json={"amount_minor": 1_000, "order_id": str(placed.order_id), "reason": "goodwill"},
            headers={**admin.headers, "Idempotency-Key": uuid.uuid4().hex},
        ),
        201,
    )
    await drain(runtime)
    clock.advance(runtime.settings.sandbox_delay_seconds)
    await drain(runtime)
    sandbox = SandboxProvider(runtime)
    state = await sandbox.fetch(str(stored.provider_payment_id), payment["id"])
    assert state.status == "succeeded"
    async with runtime.db.transaction(read_only=True) as session:
        charge = await session.get(SandboxCharge, uuid.UUID(str(stored.provider_payment_id)))
        assert charge is not None
        refunds = (await session.scalars(select(SandboxRefund))).all()
    assert charge.refunded_minor == 1_000
    assert [(r.reference, r.amount_minor) for r in refunds] == [(refund["id"], 1_000)]
    assert (await _payment(runtime, payment["id"])).refunded_minor == 1_000
    assert "refund.succeeded" in {e.event_type for e in await _events(runtime)}
    await _no_failed_jobs(runtime)
