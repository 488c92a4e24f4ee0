"""The sandbox provider's start, fetch and refund, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx2
import pytest
from sqlalchemy import func, select, text, update

from soko.payments.providers.base import (
    NextActionKind,
    PaymentProvider,
    ProviderError,
    ProviderStatus,
    RefundRequest,
    RefundStatus,
)
from soko.payments.providers.sandbox import PAGE_TOKEN, SandboxProvider
from soko.payments.sandbox_models import SandboxCharge, SandboxRefund
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.payments.test_sandbox_support import (
    a_payment,
    drain,
    install_inbound,
    page_path,
    queued_deliveries,
)


@pytest.fixture
def sandbox(runtime: Runtime) -> SandboxProvider:
    return SandboxProvider(runtime)


async def _charge(runtime: Runtime, charge_id: str) -> SandboxCharge:
    async with runtime.db.transaction(read_only=True) as session:
        charge = await session.get(SandboxCharge, uuid.UUID(charge_id))
    assert charge is not None
    return charge


async def _decide(runtime: Runtime, charge_id: str, status: str) -> None:
    async with runtime.db.transaction() as session:
        await session.execute(
            update(SandboxCharge)
            .where(SandboxCharge.id == uuid.UUID(charge_id))
            .values(status=status)
        )


def _refund(charge_id: str, amount: int, reference: str = "ref-1", **extra: str) -> RefundRequest:
    values = {
        "reference": reference,
        "provider_payment_id": charge_id,
        "payment_reference": "pay-0001",
        "amount_minor": amount,
        "currency": "KES",
        "reason": "cancelled",
    }
    values.update(extra)
    return RefundRequest(**values)  # type: ignore[arg-type]


async def test_it_is_a_payment_provider(sandbox: SandboxProvider) -> None:
    assert isinstance(sandbox, PaymentProvider)
    assert sandbox.name == "sandbox"


async def test_start_opens_a_charge_and_answers_its_page(
    runtime: Runtime, sandbox: SandboxProvider
) -> None:
    started = await sandbox.start(a_payment())
    await drain(runtime)
    assert started.next_action is NextActionKind.redirect
    assert started.url is not None
    assert started.url.startswith(f"{runtime.settings.public_url}/sandbox/pay/")
    token = started.url.rsplit("/", 1)[1]
    assert PAGE_TOKEN.fullmatch(token)
    charge = await _charge(runtime, started.provider_payment_id)
    assert (charge.reference, charge.amount_minor, charge.currency) == ("pay-0001", 12_500, "KES")
    assert charge.status == "pending" and charge.refunded_minor == 0
    # The token is stored only as its digest; the provider id opens nothing.
    assert token not in charge.page_token_hash and len(charge.page_token_hash) == 64
    assert started.provider_payment_id not in started.url

    state = await sandbox.fetch(started.provider_payment_id, "pay-0001")
    assert state.status is ProviderStatus.pending
    assert (state.amount_minor, state.currency, state.reference) == (12_500, "KES", "pay-0001")


async def test_a_retried_start_finds_the_same_charge_with_a_fresh_link(
    runtime: Runtime, sandbox: SandboxProvider, client: httpx2.AsyncClient
) -> None:
    first = await sandbox.start(a_payment())
    second = await sandbox.start(a_payment())
    await drain(runtime)
    assert first.provider_payment_id == second.provider_payment_id
    assert first.url != second.url
    async with runtime.db.transaction(read_only=True) as session:
        count = await session.scalar(select(func.count()).select_from(SandboxCharge))
    assert count == 1
    assert (await client.get(page_path(first.url))).status_code == 404
    assert (await client.get(page_path(second.url))).status_code == 200
    with pytest.raises(ProviderError, match="another amount") as refused:
        await sandbox.start(a_payment(amount_minor=99))
    assert refused.value.retryable is False


@pytest.mark.parametrize(
    "bad",
    [
        {"amount_minor": 0},
        {"amount_minor": -5},
        {"amount_minor": 10**16},
        {"currency": "XXX"},
        {"currency": "kes"},
        {"reference": ""},
        {"reference": "a b"},
        {"reference": "x" * 101},
        {"return_url": "javascript:alert(1)"},
        {"return_url": "/relative"},
        {"return_url": "https://user:pw@shop.example/"},
        {"return_url": "https://shop.example/\nSet-Cookie: x"},
    ],
)
async def test_start_refuses_bad_input_and_stores_nothing(
    runtime: Runtime, sandbox: SandboxProvider, bad: dict[str, object]
) -> None:
    with pytest.raises(ProviderError) as refused:
        await sandbox.start(a_payment(**bad))
    assert refused.value.retryable is False
    await drain(runtime)
    async with runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(select(func.count()).select_from(SandboxCharge)) == 0


async def test_fetch_of_an_unknown_charge_is_an_error(
    runtime: Runtime, sandbox: SandboxProvider
) -> None:
    started = await sandbox.start(a_payment())
    await drain(runtime)
    for provider_id, reference in (
        (str(uuid.uuid4()), "pay-0001"),
        ("not-a-uuid", "pay-0001"),
        (started.provider_payment_id, "pay-other"),  # someone else's charge
    ):
        with pytest.raises(ProviderError, match="no such charge") as missing:
            await sandbox.fetch(provider_id, reference)
        assert missing.value.retryable is False


@pytest.mark.parametrize("status", ["succeeded", "failed", "abandoned"])
async def test_fetch_reports_the_decision(
    runtime: Runtime, sandbox: SandboxProvider, status: str
) -> None:
    started = await sandbox.start(a_payment())
    await drain(runtime)
    await _decide(runtime, started.provider_payment_id, status)
    state = await sandbox.fetch(started.provider_payment_id, "pay-0001")
    assert state.status == status
    assert (state.failure_reason is None) == (status == "succeeded")


async def _captured(runtime: Runtime, sandbox: SandboxProvider) -> str:
    started = await sandbox.start(a_payment())
    await drain(runtime)
    await _decide(runtime, started.provider_payment_id, "succeeded")
    return started.provider_payment_id


async def test_refunds_succeed_at_once_up_to_the_captured_amount(
    runtime: Runtime, sandbox: SandboxProvider, clock: ManualClock
) -> None:
    inbound = install_inbound(runtime, sandbox)
    charge_id = await _captured(runtime, sandbox)
    first = await sandbox.refund(_refund(charge_id, 5_000, "ref-1"))
    assert first.status is RefundStatus.succeeded
    again = await sandbox.refund(_refund(charge_id, 5_000, "ref-1"))  # a retry
    assert again.provider_refund_id == first.provider_refund_id
    with pytest.raises(ProviderError, match="another amount"):
        await sandbox.refund(_refund(charge_id, 4_000, "ref-1"))
    with pytest.raises(ProviderError, match="exceeds what remains refundable") as too_much:
        await sandbox.refund(_refund(charge_id, 7_501, "ref-2"))
    assert too_much.value.retryable is False
    rest = await sandbox.refund(_refund(charge_id, 7_500, "ref-3"))
    assert rest.status is RefundStatus.succeeded
    with pytest.raises(ProviderError, match="exceeds"):
        await sandbox.refund(_refund(charge_id, 1, "ref-4"))
    await drain(runtime)
    charge = await _charge(runtime, charge_id)
    assert charge.refunded_minor == 12_500
    async with runtime.db.transaction(read_only=True) as session:
        refunds = (await session.scalars(select(SandboxRefund))).all()
    assert sorted((r.reference, r.amount_minor) for r in refunds) == [
        ("ref-1", 5_000),
        ("ref-3", 7_500),
    ]
    # Each refund is announced by a signed refund.succeeded webhook.
    clock.advance(runtime.settings.sandbox_delay_seconds)
    await drain(runtime)
    refunded = [e for e in inbound.events if e.event_type == "refund.succeeded"]
    assert len(refunded) == 2 and all(e.status is None for e in refunded)
    data = sorted(b["data"]["refund_amount_minor"] for b in inbound.bodies())
    assert data == [5_000, 7_500]


@pytest.mark.parametrize(
    ("status", "change", "message"),
    [
        ("pending", {}, "not captured"),
        ("failed", {}, "not captured"),
        ("succeeded", {"currency": "NGN"}, "currency"),
        ("succeeded", {"payment_reference": "pay-other"}, "no such charge"),
    ],
)
async def test_refunds_of_charges_not_captured_are_refused(
    runtime: Runtime,
    sandbox: SandboxProvider,
    status: str,
    change: dict[str, str],
    message: str,
) -> None:
    started = await sandbox.start(a_payment())
    await drain(runtime)
    await _decide(runtime, started.provider_payment_id, status)
    with pytest.raises(ProviderError, match=message):
        await sandbox.refund(_refund(started.provider_payment_id, 100, **change))
    await drain(runtime)
    async with runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(select(func.count()).select_from(SandboxRefund)) == 0
    assert (await _charge(runtime, started.provider_payment_id)).refunded_minor == 0


async def test_concurrent_refunds_never_exceed_the_capture(
    runtime: Runtime, sandbox: SandboxProvider
) -> None:
    charge_id = await _captured(runtime, sandbox)
    results = await asyncio.gather(
        *(sandbox.refund(_refund(charge_id, 5_000, f"ref-{n}")) for n in range(5)),
        return_exceptions=True,
    )
    await drain(runtime)
    succeeded = [r for r in results if not isinstance(r, BaseException)]
    assert len(succeeded) == 2
    assert all(isinstance(r, ProviderError) for r in results if isinstance(r, BaseException))
    assert (await _charge(runtime, charge_id)).refunded_minor == 10_000


async def test_start_and_refund_work_inside_a_callers_open_write_transaction(
    runtime: Runtime, sandbox: SandboxProvider
) -> None:
    """A refund is sent from a job, whose transaction holds SQLite's only write lock;
    the sandbox must not wait for that lock while its caller waits for it."""
    charge_id = await _captured(runtime, sandbox)
    async with runtime.db.transaction() as session:
        # On SQLite this begins IMMEDIATE: the write lock is held from here on, as a
        # job's transaction holds it.
        await session.execute(text("SELECT 1"))
        result = await asyncio.wait_for(sandbox.refund(_refund(charge_id, 2_000)), timeout=10)
        started = await asyncio.wait_for(sandbox.start(a_payment("pay-0002")), timeout=10)
        # Answered from the staged write before it reached the database.
        state = await asyncio.wait_for(sandbox.fetch(started.provider_payment_id, "pay-0002"), 10)
        assert state.status is ProviderStatus.pending
    assert result.status is RefundStatus.succeeded
    await drain(runtime)
    assert (await _charge(runtime, charge_id)).refunded_minor == 2_000
    assert (await _charge(runtime, started.provider_payment_id)).reference == "pay-0002"
    deliveries = await queued_deliveries(runtime)
    assert [json.loads(m.payload["body"])["type"] for m in deliveries] == ["refund.succeeded"]


async def test_a_refund_of_an_unknown_charge_is_refused(
    runtime: Runtime, sandbox: SandboxProvider
) -> None:
    for charge_id in (str(uuid.uuid4()), "ch_not_a_uuid"):
        with pytest.raises(ProviderError, match="no such charge") as refused:
            await sandbox.refund(_refund(charge_id, 100))
        assert refused.value.retryable is False
    await drain(runtime)
    async with runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(select(func.count()).select_from(SandboxRefund)) == 0
