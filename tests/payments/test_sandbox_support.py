"""Helpers for the sandbox provider's tests (no tests here): running its deliveries to
the end, and an inbound endpoint that records what it receives and checks signatures."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
from sqlalchemy import select

from soko.payments.providers.base import InboundEvent, PaymentStart
from soko.payments.providers.sandbox import SandboxProvider
from soko.payments.sandbox_delivery import DELIVER_JOB, TRANSPORT_EXTENSION, settle_sandbox
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime

RETURN_URL = "https://shop.example/checkout/done?from=sandbox"


def a_payment(
    reference: str = "pay-0001", amount_minor: int = 12_500, **extra: Any
) -> PaymentStart:
    values: dict[str, Any] = {
        "reference": reference,
        "amount_minor": amount_minor,
        "currency": "KES",
        "customer_email": "buyer@example.com",
        "return_url": RETURN_URL,
        "description": "Order at Soko",
    }
    values.update(extra)
    return PaymentStart(**values)


def page_path(url: str | None) -> str:
    assert url is not None
    path = url.split("://", 1)[1]
    return path[path.index("/") :]


async def drain(runtime: Runtime) -> None:
    """Run the outbox and the sandbox's background work (SQLite) until both are idle."""
    while True:
        claimed = await runtime.dispatcher.run_until_idle()
        settled = await settle_sandbox(runtime)
        if not claimed and not settled:
            return


@dataclass
class Inbound:
    """A receiver for sandbox webhooks: records each request, verifies it with the
    provider, and answers the statuses queued in ``answers`` (then 200)."""

    provider: SandboxProvider
    runtime: Runtime
    answers: list[int] = field(default_factory=list)
    requests: list[httpx2.Request] = field(default_factory=list)
    events: list[InboundEvent] = field(default_factory=list)

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        event = self.provider.verify_webhook(headers, request.content, self.runtime.clock.now())
        status = self.answers.pop(0) if self.answers else 200
        if 200 <= status < 300:
            self.events.append(event)
        return httpx2.Response(status, json={"received": True})

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def install_inbound(runtime: Runtime, provider: SandboxProvider) -> Inbound:
    inbound = Inbound(provider, runtime)
    runtime.extensions[TRANSPORT_EXTENSION] = httpx2.MockTransport(inbound.handler)
    return inbound


async def queued_deliveries(
    runtime: Runtime, where: Callable[[OutboxMessage], bool] = lambda m: True
) -> list[OutboxMessage]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = (
            await session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.name == DELIVER_JOB)
                .order_by(OutboxMessage.available_at, OutboxMessage.created_at)
            )
        ).all()
    return [row for row in rows if where(row)]
