"""The built-in sandbox provider: the embedded default, for development and demos.

It behaves like an external provider that happens to live in Soko's process and
database. :meth:`SandboxProvider.start` opens a charge (in a transaction of its own, not
the caller's) and sends the buyer to a hosted page, ``/sandbox/pay/<token>``
(:mod:`soko.payments.routes_sandbox`), where a person chooses succeed, fail or abandon.
The choice is then delivered as a signed webhook to Soko's inbound route, the path every
real provider's webhooks take (:mod:`soko.payments.sandbox_delivery`), with a chosen
delay, duplicate deliveries and a stale out-of-order event as options. :meth:`fetch`
answers from the charge, and :meth:`refund` refunds it at once (never beyond what was
captured) and sends a ``refund.succeeded`` webhook.

Its tables are :mod:`soko.payments.sandbox_models`. Production refuses it (see
``Settings``): the page lets anyone holding the link decide a payment.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.providers.base import (
    InboundEvent,
    NextActionKind,
    PaymentStart,
    PaymentState,
    ProviderError,
    ProviderStatus,
    RefundRequest,
    RefundResult,
    RefundStatus,
    StartedPayment,
    WebhookRejectedError,
)
from soko.payments.providers.signatures import verify_timestamped
from soko.payments.sandbox_delivery import (
    SIGNATURE_HEADER,
    SIGNATURE_TOLERANCE_SECONDS,
    ChargeFacts,
    DeliveryPlan,
    SandboxEventType,
    StagedCharge,
    StagedRefund,
    queue_refund_event,
    run_deferred_write,
    sandbox_state,
    webhook_key,
)
from soko.payments.sandbox_models import (
    REFERENCE_MAX_LENGTH,
    RETURN_URL_MAX_LENGTH,
    ChargeStatus,
    SandboxCharge,
    SandboxRefund,
)
from soko.platform.db import dialect_insert
from soko.platform.ids import uuid7
from soko.platform.money import MINOR_UNITS

if TYPE_CHECKING:
    from soko.platform.runtime import Runtime

PROVIDER_NAME = "sandbox"
PAGE_PATH = "/sandbox/pay/"
# 256 random bits, base64url without padding.
PAGE_TOKEN_BYTES = 32
PAGE_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
MAX_AMOUNT_MINOR = 10**15
DESCRIPTION_MAX_LENGTH = 200
_REFERENCE = re.compile(rf"[A-Za-z0-9._:-]{{1,{REFERENCE_MAX_LENGTH}}}")
_EVENT_ID = re.compile(r"evt_[0-9a-f]{32}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_FAILURE_REASONS = {
    ChargeStatus.failed: "declined on the sandbox page",
    ChargeStatus.abandoned: "abandoned on the sandbox page",
}


def page_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def page_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}{PAGE_PATH}{token}"


def valid_return_url(url: str) -> bool:
    """An absolute http(s) URL without credentials or control characters, or nothing."""
    if url == "":
        return True
    if len(url) > RETURN_URL_MAX_LENGTH or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc


def facts_of(charge: SandboxCharge) -> ChargeFacts:
    return ChargeFacts(
        charge.id, charge.reference, charge.status, charge.amount_minor, charge.currency
    )


class SandboxProvider:
    """The sandbox as a :class:`~soko.payments.providers.base.PaymentProvider`."""

    name = PROVIDER_NAME
    refunds_are_idempotent = True  # refunds are kept by their reference

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._key = webhook_key(runtime.settings)
        self._state = sandbox_state(runtime)

    @property
    def _defer_writes(self) -> bool:
        # See SandboxState: on SQLite the caller may hold the only write lock.
        return self._runtime.db.dialect == "sqlite"

    def _error(self, message: str, *, retryable: bool = False) -> ProviderError:
        return ProviderError(self.name, message, retryable=retryable)

    # -- start -----------------------------------------------------------------------

    async def start(self, payment: PaymentStart) -> StartedPayment:
        """Open a charge for ``payment`` and answer the page to send the buyer to.

        A second start with the same reference (a retry) finds the first charge, which
        must be for the same amount and currency, and answers a fresh page link to it
        (only the token's digest is stored, so the old link stops working)."""
        self._check_start(payment)
        token = secrets.token_urlsafe(PAGE_TOKEN_BYTES)
        token_hash = page_token_hash(token)
        now = self._runtime.clock.now()
        if self._defer_writes:
            charge_id = await self._stage_start(payment, token_hash, now)
        else:
            async with self._runtime.db.transaction() as session:
                charge_id = await self._write_start(session, payment, token_hash, now, uuid7())
        return StartedPayment(
            provider_payment_id=str(charge_id),
            next_action=NextActionKind.redirect,
            url=page_url(self._runtime.settings.public_url, token),
        )

    def _check_start(self, payment: PaymentStart) -> None:
        if not _REFERENCE.fullmatch(payment.reference):
            raise self._error("the reference must be 1 to 100 letters, digits or ._:-")
        if (
            not isinstance(payment.amount_minor, int)
            or isinstance(payment.amount_minor, bool)
            or not 0 < payment.amount_minor <= MAX_AMOUNT_MINOR
        ):
            raise self._error("the amount must be a positive whole number of minor units")
        if payment.currency not in MINOR_UNITS:
            raise self._error("the currency is not a known ISO 4217 code")
        if not valid_return_url(payment.return_url):
            raise self._error("the return URL must be an absolute http(s) URL")

    async def _write_start(
        self,
        session: AsyncSession,
        payment: PaymentStart,
        token_hash: str,
        now: dt.datetime,
        new_id: uuid.UUID,
    ) -> uuid.UUID:
        """Insert the charge, or (same reference) point the existing one at the new
        token; one statement settles two concurrent starts of one reference."""
        values = {
            "id": new_id,
            "page_token_hash": token_hash,
            "reference": payment.reference,
            "amount_minor": payment.amount_minor,
            "currency": payment.currency,
            "status": ChargeStatus.pending.value,
            "refunded_minor": 0,
            "return_url": payment.return_url,
            "description": payment.description[:DESCRIPTION_MAX_LENGTH],
            "created_at": now,
            "updated_at": now,
        }
        inserted = (
            await session.execute(
                dialect_insert(session)(SandboxCharge)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["reference"])
                .returning(SandboxCharge.id)
            )
        ).scalar_one_or_none()
        if inserted is not None:
            return uuid.UUID(str(inserted))
        existing = (
            await session.execute(
                update(SandboxCharge)
                .where(
                    SandboxCharge.reference == payment.reference,
                    SandboxCharge.amount_minor == payment.amount_minor,
                    SandboxCharge.currency == payment.currency,
                )
                .values(page_token_hash=token_hash, updated_at=now)
                .returning(SandboxCharge.id)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        if existing is None:
            raise self._error("a charge with this reference exists for another amount")
        return uuid.UUID(str(existing))

    async def _stage_start(
        self, payment: PaymentStart, token_hash: str, now: dt.datetime
    ) -> uuid.UUID:
        state = self._state
        existing: tuple[uuid.UUID, int, str] | None = None
        while True:
            # A staged write that finishes while the database is read would be neither
            # staged nor (in that read) stored: read again if one did.
            generation = state.generation
            staged_id = state.staged_references.get(payment.reference)
            if staged_id is not None:
                facts = state.staged_charges[staged_id].facts
                existing = (staged_id, facts.amount_minor, facts.currency)
                break
            async with self._runtime.db.reading() as connection:
                row = (
                    await connection.execute(
                        select(
                            SandboxCharge.id, SandboxCharge.amount_minor, SandboxCharge.currency
                        ).where(SandboxCharge.reference == payment.reference)
                    )
                ).first()
            existing = (row.id, row.amount_minor, row.currency) if row is not None else None
            if generation == state.generation:
                break
        if existing is not None and existing[1:] != (payment.amount_minor, payment.currency):
            raise self._error("a charge with this reference exists for another amount")
        charge_id = existing[0] if existing is not None else uuid7()
        facts = ChargeFacts(
            charge_id,
            payment.reference,
            ChargeStatus.pending.value,
            payment.amount_minor,
            payment.currency,
        )
        state.staged_charges[charge_id] = StagedCharge(facts)
        state.staged_references[payment.reference] = charge_id

        async def write(session: AsyncSession) -> None:
            await self._write_start(session, payment, token_hash, now, charge_id)

        def unstage() -> None:
            # A later start of the same reference may have staged again meanwhile.
            if state.staged_references.get(payment.reference) == charge_id:
                state.staged_references.pop(payment.reference, None)
                state.staged_charges.pop(charge_id, None)
            state.generation += 1

        state.spawn_write(
            run_deferred_write(self._runtime, write, what="sandbox charge", on_done=unstage),
            name="sandbox charge write",
        )
        return charge_id

    # -- webhooks --------------------------------------------------------------------

    def verify_webhook(
        self, headers: Mapping[str, str], raw_body: bytes, now: dt.datetime
    ) -> InboundEvent:
        verify_timestamped(
            headers.get(SIGNATURE_HEADER),
            key=self._key,
            raw_body=raw_body,
            now=now,
            name=SIGNATURE_HEADER,
            tolerance_seconds=SIGNATURE_TOLERANCE_SECONDS,
        )
        return self._parse_event(raw_body)

    def _parse_event(self, raw_body: bytes) -> InboundEvent:
        try:
            event = json.loads(raw_body)
        except (ValueError, UnicodeDecodeError):
            raise WebhookRejectedError("the body is not JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
            raise WebhookRejectedError("the body is not a sandbox event")
        data: dict[str, Any] = event["data"]
        event_id, event_type, created = event.get("id"), event.get("type"), event.get("created")
        amount, currency = data.get("amount_minor"), data.get("currency")
        reference, charge_id = data.get("reference"), data.get("charge_id")
        try:
            kind = SandboxEventType(str(event_type))
        except ValueError:
            raise WebhookRejectedError("unknown event type") from None
        if (
            not isinstance(event_id, str)
            or not _EVENT_ID.fullmatch(event_id)
            or not isinstance(created, int)
            or isinstance(created, bool)
            or not isinstance(amount, int)
            or isinstance(amount, bool)
            or amount <= 0
            or not isinstance(currency, str)
            or not _CURRENCY.fullmatch(currency)
            or not isinstance(reference, str)
            or not _REFERENCE.fullmatch(reference)
            or not isinstance(charge_id, str)
        ):
            raise WebhookRejectedError("the event is missing or has malformed fields")
        try:
            occurred_at = dt.datetime.fromtimestamp(created, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise WebhookRejectedError("the event's time is out of range") from None
        status = None
        if kind is not SandboxEventType.refund_succeeded:
            status = ProviderStatus(kind.value.removeprefix("charge."))
        return InboundEvent(
            provider=self.name,
            event_id=event_id,
            event_type=kind.value,
            reference=reference,
            provider_payment_id=charge_id,
            status=status,
            amount_minor=amount,
            currency=currency,
            occurred_at=occurred_at,
        )

    # -- fetch -----------------------------------------------------------------------

    def _charge_id(self, provider_payment_id: str) -> uuid.UUID:
        try:
            return uuid.UUID(provider_payment_id)
        except (ValueError, TypeError, AttributeError):
            raise self._error("no such charge") from None

    async def fetch(self, provider_payment_id: str, reference: str) -> PaymentState:
        """The charge as it stands. Reads only, so it is safe inside a caller's
        transaction on either backend."""
        charge_id = self._charge_id(provider_payment_id)
        staged = self._state.staged_charges.get(charge_id)
        facts: ChargeFacts | None = staged.facts if staged is not None else None
        if facts is None:
            async with self._runtime.db.reading() as connection:
                row = (
                    await connection.execute(
                        select(
                            SandboxCharge.id,
                            SandboxCharge.reference,
                            SandboxCharge.status,
                            SandboxCharge.amount_minor,
                            SandboxCharge.currency,
                        ).where(SandboxCharge.id == charge_id)
                    )
                ).first()
            if row is not None:
                facts = ChargeFacts(
                    row.id, row.reference, row.status, row.amount_minor, row.currency
                )
        if facts is None or (reference and facts.reference != reference):
            raise self._error("no such charge")
        status = ChargeStatus(facts.status)
        return PaymentState(
            provider_payment_id=str(facts.charge_id),
            reference=facts.reference,
            status=ProviderStatus(status.value),
            amount_minor=facts.amount_minor,
            currency=facts.currency,
            failure_reason=_FAILURE_REASONS.get(status),
        )

    # -- refunds ---------------------------------------------------------------------

    async def refund(self, refund: RefundRequest) -> RefundResult:
        """Refund part or all of a captured charge, at once, and queue its
        ``refund.succeeded`` webhook. Idempotent on ``refund.reference``; refused
        (not retryable) beyond what remains captured, or for a charge not captured."""
        if not _REFERENCE.fullmatch(refund.reference):
            raise self._error("the refund reference must be 1 to 100 letters, digits or ._:-")
        if (
            not isinstance(refund.amount_minor, int)
            or isinstance(refund.amount_minor, bool)
            or refund.amount_minor <= 0
        ):
            raise self._error("the refund amount must be a positive whole number")
        charge_id = self._charge_id(refund.provider_payment_id)
        if self._defer_writes:
            refund_id = await self._stage_refund(charge_id, refund)
        else:
            async with self._runtime.db.transaction() as session:
                refund_id = await self._write_refund(session, charge_id, refund, uuid7())
        return RefundResult(provider_refund_id=str(refund_id), status=RefundStatus.succeeded)

    async def _write_refund(
        self,
        session: AsyncSession,
        charge_id: uuid.UUID,
        refund: RefundRequest,
        refund_id: uuid.UUID,
    ) -> uuid.UUID:
        now = self._runtime.clock.now()
        known = await session.scalar(select(SandboxCharge.id).where(SandboxCharge.id == charge_id))
        if known is None:
            raise self._error("no such charge")
        # The refund row first: a concurrent request with the same reference waits on
        # it (PostgreSQL) and then finds it, so one reference never refunds twice.
        inserted = (
            await session.execute(
                dialect_insert(session)(SandboxRefund)
                .values(
                    id=refund_id,
                    charge_id=charge_id,
                    reference=refund.reference,
                    amount_minor=refund.amount_minor,
                    currency=refund.currency,
                    reason=refund.reason[:200],
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["charge_id", "reference"])
                .returning(SandboxRefund.id)
            )
        ).scalar_one_or_none()
        if inserted is None:
            return await self._existing_refund(session, charge_id, refund)
        charge = (
            await session.execute(
                update(SandboxCharge)
                .where(
                    SandboxCharge.id == charge_id,
                    SandboxCharge.reference == refund.payment_reference,
                    SandboxCharge.status == ChargeStatus.succeeded.value,
                    SandboxCharge.currency == refund.currency,
                    SandboxCharge.refunded_minor + refund.amount_minor
                    <= SandboxCharge.amount_minor,
                )
                .values(
                    refunded_minor=SandboxCharge.refunded_minor + refund.amount_minor,
                    updated_at=now,
                )
                .returning(SandboxCharge)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        if charge is None:
            # Raising rolls the refund row back with the rest of this transaction.
            raise self._error(await self._refusal(session, charge_id, refund))
        settings = self._runtime.settings
        await queue_refund_event(
            session,
            facts_of(charge),
            refund_id=refund_id,
            refund_reference=refund.reference,
            refund_amount_minor=refund.amount_minor,
            plan=DeliveryPlan(
                settings.sandbox_delay_seconds, settings.sandbox_duplicate_deliveries
            ),
            now=now,
        )
        return refund_id

    async def _existing_refund(
        self, session: AsyncSession, charge_id: uuid.UUID, refund: RefundRequest
    ) -> uuid.UUID:
        row = (
            await session.execute(
                select(SandboxRefund.id, SandboxRefund.amount_minor).where(
                    SandboxRefund.charge_id == charge_id,
                    SandboxRefund.reference == refund.reference,
                )
            )
        ).one()
        if row.amount_minor != refund.amount_minor:
            raise self._error("this refund reference was used for another amount")
        return uuid.UUID(str(row.id))

    async def _refusal(
        self, session: AsyncSession, charge_id: uuid.UUID, refund: RefundRequest
    ) -> str:
        charge = await session.get(SandboxCharge, charge_id)
        if charge is None or charge.reference != refund.payment_reference:
            return "no such charge"
        if charge.status != ChargeStatus.succeeded:
            return f"the charge is {charge.status}, not captured"
        if charge.currency != refund.currency:
            return "the refund's currency is not the charge's"
        remaining = charge.amount_minor - charge.refunded_minor
        return f"the refund exceeds what remains refundable ({remaining} minor units)"

    async def _stage_refund(self, charge_id: uuid.UUID, refund: RefundRequest) -> uuid.UUID:
        state = self._state
        key = (charge_id, refund.reference)
        staged = state.staged_refunds.get(key)
        if staged is not None:
            if staged.amount_minor != refund.amount_minor:
                raise self._error("this refund reference was used for another amount")
            return staged.refund_id
        while True:
            # As in _stage_start: a staged refund committing during the read would be
            # counted neither as staged nor as stored.
            generation = state.generation
            async with self._runtime.db.reading() as connection:
                charge = (
                    await connection.execute(
                        select(
                            SandboxCharge.reference,
                            SandboxCharge.status,
                            SandboxCharge.currency,
                            SandboxCharge.amount_minor,
                            SandboxCharge.refunded_minor,
                        ).where(SandboxCharge.id == charge_id)
                    )
                ).first()
                done = (
                    await connection.execute(
                        select(SandboxRefund.id, SandboxRefund.amount_minor).where(
                            SandboxRefund.charge_id == charge_id,
                            SandboxRefund.reference == refund.reference,
                        )
                    )
                ).first()
            if generation == state.generation:
                break
        staged = state.staged_refunds.get(key)
        if staged is not None:  # staged by a concurrent call meanwhile
            if staged.amount_minor != refund.amount_minor:
                raise self._error("this refund reference was used for another amount")
            return staged.refund_id
        if done is not None:
            if done.amount_minor != refund.amount_minor:
                raise self._error("this refund reference was used for another amount")
            return uuid.UUID(str(done.id))
        # Checked again in the deferred write; answering here is what lets the caller
        # keep its transaction (and the lock) while the sandbox "processes" the refund.
        if charge is None or charge.reference != refund.payment_reference:
            raise self._error("no such charge")
        if charge.status != ChargeStatus.succeeded:
            raise self._error(f"the charge is {charge.status}, not captured")
        if charge.currency != refund.currency:
            raise self._error("the refund's currency is not the charge's")
        remaining = (
            charge.amount_minor - charge.refunded_minor - state.staged_refunded_minor(charge_id)
        )
        if refund.amount_minor > remaining:
            raise self._error(
                f"the refund exceeds what remains refundable ({max(remaining, 0)} minor units)"
            )
        refund_id = uuid7()
        state.staged_refunds[key] = StagedRefund(refund_id, charge_id, refund.amount_minor)

        async def write(session: AsyncSession) -> None:
            await self._write_refund(session, charge_id, refund, refund_id)

        state.spawn_write(
            run_deferred_write(
                self._runtime,
                write,
                what="sandbox refund",
                on_done=lambda: state.unstage_refund(key),
            ),
            name="sandbox refund write",
        )
        return refund_id

    # -- readiness -------------------------------------------------------------------

    def readiness(self) -> Mapping[str, object]:
        return {"status": "up", "circuit": "closed", "backend": "sandbox"}
