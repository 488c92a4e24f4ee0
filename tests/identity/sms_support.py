"""Phone numbers, the codes texted to them, and accounts holding them, for the SMS code
tests. Codes are read back from the embedded SMS sink, as a developer would."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from sqlalchemy import select

from soko.identity.accounts import create_user
from soko.identity.models import AuditEvent, OneTimeCode, Role
from soko.notifications.public import read_sink
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime

OTP = "/api/v1/auth/otp"
REQUEST = f"{OTP}/request"
VERIFY = f"{OTP}/verify"
# Safaricom-style Kenyan mobile numbers, valid for phonenumbers.
FIRST_NUMBER = 712_345_600
CODE_IN_TEXT = re.compile(r"\b(\d{6})\b")


def kenyan_number(n: int) -> str:
    """The n-th distinct test number in E.164."""
    return f"+254{FIRST_NUMBER + n}"


async def ask_code(client: httpx2.AsyncClient, phone: str, **extra: Any) -> httpx2.Response:
    return await client.post(REQUEST, json={"phone": phone, **extra})


async def send_code(
    client: httpx2.AsyncClient, phone: str, code: str, **extra: Any
) -> httpx2.Response:
    return await client.post(VERIFY, json={"phone": phone, "code": code, **extra})


async def texts_to(runtime: Runtime, phone: str) -> list[dict[str, Any]]:
    """Every SMS delivered to ``phone`` so far, oldest first, after delivering what the
    outbox holds."""
    await runtime.dispatcher.run_until_idle()
    return [sms for sms in read_sink(runtime.settings.data_dir, "sms") if sms["to"] == phone]


async def last_code(runtime: Runtime, phone: str) -> str:
    texts = await texts_to(runtime, phone)
    assert texts, f"no SMS was sent to {phone}"
    found = CODE_IN_TEXT.search(texts[-1]["body"])
    assert found is not None, texts[-1]["body"]
    return found.group(1)


def wrong_code(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def advance(runtime: Runtime, seconds: float) -> None:
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    clock.advance(dt.timedelta(seconds=seconds))


async def phone_account(
    runtime: Runtime, phone: str, *, verified: bool = True, display_name: str = "Achieng"
) -> uuid.UUID:
    async with runtime.db.transaction() as session:
        user = await create_user(
            session,
            runtime.data_keys,
            now=runtime.clock.now(),
            phone=phone,
            display_name=display_name,
            roles=(Role.customer,),
            phone_verified=verified,
        )
    return user.id


async def code_rows(runtime: Runtime) -> list[OneTimeCode]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.scalars(select(OneTimeCode).order_by(OneTimeCode.created_at))
        return list(rows.all())


async def audit_events(runtime: Runtime, *actions: str) -> list[AuditEvent]:
    async with runtime.db.transaction(read_only=True) as session:
        query = select(AuditEvent).order_by(AuditEvent.seq)
        if actions:
            query = query.where(AuditEvent.action.in_(actions))
        return list((await session.scalars(query)).all())


@asynccontextmanager
async def client_at(app: Any, ip: str) -> AsyncIterator[httpx2.AsyncClient]:
    """A client whose requests come from the address ``ip``."""
    transport = httpx2.ASGITransport(app=app, client=(ip, 40_000))
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c
