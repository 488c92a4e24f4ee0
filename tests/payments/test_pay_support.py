"""What the payments core tests share (no tests of its own): a provider kept in memory
that signs its webhooks with a real HMAC, installed where the registry finds it, and
helpers to check out, pay, deliver webhooks and drive the outbox.

The provider answers :meth:`fetch` from what a test said happened at the provider, so a
webhook can lie (or arrive late) and the test sees Soko act on the provider's word."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from sqlalchemy import func, select

from soko.payments import ledger
from soko.payments.payment_models import Payment, Refund, WebhookEvent
from soko.payments.providers.base import (
    InboundEvent,
    NextActionKind,
    PaymentStart,
    PaymentState,
    ProviderError,
    ProviderStatus,
    ProviderUnavailableError,
    RefundRequest,
    RefundResult,
    RefundStatus,
    StartedPayment,
    WebhookRejectedError,
)
from soko.platform.outbox import MessageStatus, OutboxMessage
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market, market  # noqa: F401
from tests.identity.conftest import make_user  # noqa: F401
from tests.orders.conftest import (  # noqa: F401
    API,
    ORDERS,
    Placed,
    PlaceOrder,
    make_buyer,
    ok,
    place_order,
)
from tests.orders.conftest import MakeBuyer as MakeBuyerFn  # noqa: F401

FAKE = "fake"
SECRET = b"fake-provider-webhook-secret"
SIGNATURE_HEADER = "x-fake-signature"


@dataclass
class FakeProvider:
    """A provider in memory: ``charges`` is what the provider knows (by reference)."""

    name: str = FAKE
    refunds_are_idempotent: bool = True  # it keeps refunds by their reference
    charges: dict[str, PaymentState] = field(default_factory=dict)
    starts: list[PaymentStart] = field(default_factory=list)
    refunds: list[RefundRequest] = field(default_factory=list)
    refund_outcome: str = "succeeded"  # succeeded | pending | failed | error | down
    down: bool = False
    fetches: int = 0
    status_reads: int = 0

    async def start(self, payment: PaymentStart) -> StartedPayment:
        if self.down:
            raise ProviderUnavailableError(self.name, 12.5)
        self.starts.append(payment)
        self.charges[payment.reference] = PaymentState(
            provider_payment_id=f"fk_{payment.reference}",
            reference=payment.reference,
            status=ProviderStatus.pending,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
        )
        return StartedPayment(
            provider_payment_id=f"fk_{payment.reference}",
            next_action=NextActionKind.redirect,
            url=f"https://fake.example/pay/{payment.reference}",
        )

    def verify_webhook(
        self, headers: Mapping[str, str], raw_body: bytes, now: dt.datetime
    ) -> InboundEvent:
        expected = hmac.new(SECRET, raw_body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, headers.get(SIGNATURE_HEADER, "")):
            raise WebhookRejectedError("bad signature")
        try:
            data = json.loads(raw_body)
        except ValueError:
            raise WebhookRejectedError("not JSON") from None
        status = data.get("status")
        return InboundEvent(
            provider=self.name,
            event_id=str(data["id"]),
            event_type=str(data.get("type", "charge.updated")),
            reference=data.get("reference"),
            provider_payment_id=data.get("charge"),
            status=ProviderStatus(status) if status else None,
            amount_minor=data.get("amount"),
            currency=data.get("currency"),
        )

    async def fetch(self, provider_payment_id: str, reference: str) -> PaymentState:
        self.fetches += 1
        if self.down:
            raise ProviderUnavailableError(self.name, 5)
        state = self.charges.get(reference)
        if state is None:
            raise ProviderError(self.name, "no such charge", retryable=False)
        return state

    async def refund(self, refund: RefundRequest) -> RefundResult:
        if self.refund_outcome == "down":
            raise ProviderError(self.name, "timed out", retryable=True)
        if self.refund_outcome == "error":
            raise ProviderError(self.name, "refund refused: charge disputed", retryable=False)
        if not any(r.reference == refund.reference for r in self.refunds):
            self.refunds.append(refund)
        return RefundResult(f"re_{refund.reference}", RefundStatus(self.refund_outcome))

    async def refund_status(self, provider_refund_id: str, refund: RefundRequest) -> RefundResult:
        """Following up a pending refund: what became of it, never a second refund."""
        self.status_reads += 1
        return RefundResult(provider_refund_id, RefundStatus(self.refund_outcome))

    def readiness(self) -> Mapping[str, object]:
        return {"status": "down" if self.down else "up", "circuit": "closed"}

    # -- what tests make happen at the provider -------------------------------------

    def settle(
        self,
        reference: uuid.UUID | str,
        status: ProviderStatus,
        *,
        amount_minor: int | None = None,
        currency: str | None = None,
    ) -> None:
        old = self.charges[str(reference)]
        self.charges[str(reference)] = PaymentState(
            provider_payment_id=old.provider_payment_id,
            reference=old.reference,
            status=status,
            amount_minor=old.amount_minor if amount_minor is None else amount_minor,
            currency=old.currency if currency is None else currency,
        )

    def webhook(
        self,
        reference: uuid.UUID | str,
        status: ProviderStatus | None,
        *,
        event_id: str | None = None,
        amount_minor: int | None = None,
        secret: bytes = SECRET,
    ) -> tuple[bytes, dict[str, str]]:
        """A signed webhook body and its headers, as the provider would send it."""
        charge = self.charges.get(str(reference))
        body = json.dumps(
            {
                "id": event_id or f"evt_{uuid.uuid4().hex}",
                "type": f"charge.{status.value if status else 'note'}",
                "reference": str(reference),
                "charge": charge.provider_payment_id if charge else None,
                "status": status.value if status else None,
                "amount": amount_minor
                if amount_minor is not None
                else (charge.amount_minor if charge else None),
                "currency": charge.currency if charge else None,
            }
        ).encode()
        signature = hmac.new(secret, body, hashlib.sha256).hexdigest()
        return body, {SIGNATURE_HEADER: signature, "content-type": "application/json"}


@pytest.fixture
def fake(runtime: Runtime) -> FakeProvider:
    provider = FakeProvider()
    runtime.extensions["payments.providers"] = {FAKE: provider}
    return provider


def pay_path(group_id: uuid.UUID) -> str:
    return f"{API}/checkout/{group_id}/payments"


WEBHOOK = f"{API}/payments/webhooks/{FAKE}"


async def start_payment(
    client: httpx2.AsyncClient, placed: Placed, *, key: str | None = None
) -> dict[str, Any]:
    headers = {**placed.buyer.headers, "Idempotency-Key": key or uuid.uuid4().hex}
    return ok(
        await client.post(pay_path(placed.group_id), json={"provider": FAKE}, headers=headers),
        201,
    )


async def deliver(
    client: httpx2.AsyncClient,
    fake: FakeProvider,
    reference: uuid.UUID | str,
    status: ProviderStatus | None,
    **kwargs: Any,
) -> httpx2.Response:
    body, headers = fake.webhook(reference, status, **kwargs)
    return await client.post(WEBHOOK, content=body, headers=headers)


async def run_jobs(runtime: Runtime) -> None:
    """Drive the outbox until nothing is due, and check no payments job failed."""
    await runtime.dispatcher.run_until_idle()
    async with runtime.db.transaction(read_only=True) as session:
        failed = (
            await session.execute(
                select(OutboxMessage.name, OutboxMessage.last_error).where(
                    OutboxMessage.name.like("payments.%"),
                    OutboxMessage.status.in_(
                        (MessageStatus.dead.value, MessageStatus.running.value)
                    ),
                )
            )
        ).all()
    assert failed == [], failed


async def pay_and_confirm(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, placed: Placed
) -> uuid.UUID:
    """Start a payment, succeed it at the provider, deliver the webhook, run the jobs."""
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    fake.settle(payment_id, ProviderStatus.succeeded)
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    return payment_id


async def payment_row(runtime: Runtime, payment_id: uuid.UUID) -> Payment:
    async with runtime.db.transaction(read_only=True) as session:
        payment = await session.get(Payment, payment_id)
        assert payment is not None
        session.expunge(payment)
        return payment


async def refunds_of(runtime: Runtime, payment_id: uuid.UUID) -> list[Refund]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = (
            await session.scalars(
                select(Refund).where(Refund.payment_id == payment_id).order_by(Refund.id)
            )
        ).all()
        for row in rows:
            session.expunge(row)
        return list(rows)


async def stored_events(runtime: Runtime) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(WebhookEvent)) or 0)


async def order_status(client: httpx2.AsyncClient, placed: Placed) -> str:
    order = ok(await client.get(f"{ORDERS}/{placed.order_id}", headers=placed.buyer.headers))
    return str(order["status"])


async def ledger_check(runtime: Runtime) -> ledger.LedgerCheck:
    async with runtime.db.transaction(read_only=True) as session:
        return await ledger.verify_ledger(session)


async def balance(runtime: Runtime, seller_id: uuid.UUID) -> dict[str, int]:
    async with runtime.db.transaction(read_only=True) as session:
        return await ledger.seller_balance(session, seller_id)
