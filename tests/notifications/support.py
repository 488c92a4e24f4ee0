"""Shared pieces of the notifications tests: a scripted provider endpoint behind
``httpx2.MockTransport`` and a transaction whose session carries the data keys."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.channels import EXTENSION, ProviderServices
from soko.notifications.models import Delivery, Suppression
from soko.platform.runtime import Runtime

Answer = Callable[[httpx2.Request], httpx2.Response]


class ScriptedProviders:
    """Answers each request with the next scripted answer (the last one repeats) and
    keeps every request for the test to read."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []
        self.answers: list[Answer] = []

    def answer(self, *answers: Answer) -> None:
        self.answers = list(answers)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if not self.answers:
            raise AssertionError(f"unexpected request to {request.url}")
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request)


def install(runtime: Runtime) -> ScriptedProviders:
    scripted = ScriptedProviders()
    services = ProviderServices(
        runtime.settings, runtime.clock, transport=httpx2.MockTransport(scripted)
    )
    runtime.extensions[EXTENSION] = services
    runtime.on_stop(services.close)
    return scripted


@asynccontextmanager
async def transaction(runtime: Runtime) -> AsyncIterator[AsyncSession]:
    async with runtime.db.transaction() as session:
        session.info["data_keys"] = runtime.data_keys
        yield session


async def deliveries(runtime: Runtime) -> list[Delivery]:
    async with runtime.db.sessionmaker() as session:
        return list(
            await session.scalars(select(Delivery).order_by(Delivery.created_at, Delivery.id))
        )


async def suppressions(runtime: Runtime) -> list[Suppression]:
    async with runtime.db.sessionmaker() as session:
        return list(await session.scalars(select(Suppression)))


def at_answer(
    status_code: int = 101, status: str = "Success", message_id: str = "ATXid_1"
) -> Answer:
    def answer(request: httpx2.Request) -> httpx2.Response:
        recipient: dict[str, Any] = {
            "statusCode": status_code,
            "number": "+254712345678",
            "status": status,
            "cost": "KES 0.8000",
        }
        if status_code in (100, 101, 102):
            recipient["messageId"] = message_id
        return httpx2.Response(
            201, json={"SMSMessageData": {"Message": "Sent", "Recipients": [recipient]}}
        )

    return answer


def status_answer(status_code: int, **json: Any) -> Answer:
    return lambda request: httpx2.Response(status_code, json=json or None)


class EventWebhookKey:
    """A P-256 key pair like SendGrid's Signed Event Webhook's."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_base64(self) -> str:
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def sign(self, timestamp: str, payload: bytes) -> str:
        signature = self.private.sign(timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()


@pytest.fixture(autouse=True)
def no_scheduled_jobs(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Import into a module whose tests count outbox messages: the domains' cron jobs
    would add theirs whenever the manual clock crosses a minute."""

    async def fire_nothing() -> None:
        return None

    monkeypatch.setattr(runtime.dispatcher, "fire_due_schedules", fire_nothing)
