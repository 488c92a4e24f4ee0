"""Delivery records and suppressions: what happened to each SMS and email.

A record is written queued with the delivery job (same transaction, same id as the
notification). The job moves it (:func:`deliver`), and so do the providers' delivery
reports (:func:`apply_report`), always forwards (``STATUS_RANK``) with conditional
updates, so a late or repeated report never undoes a later one.

A failed attempt rolls back the job's transaction with the outbox row's retry; the
next attempt copies that attempt's error (kept by the outbox) into the record, so the
record shows the attempts and the last error without a second transaction. The last
allowed attempt does not raise: it records ``failed`` and ends the job.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import structlog
from limits import parse
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.channels import Channel, configured_channel, provider_services
from soko.notifications.messages import Notification, NotificationKind
from soko.notifications.models import (
    LAST_ERROR_MAX_LENGTH,
    STATUS_RANK,
    Delivery,
    DeliveryStatus,
    Suppression,
)
from soko.notifications.providers import (
    PermanentFailure,
    RecipientRejected,
    Sent,
    TransientFailure,
)
from soko.platform.breaker import CircuitOpenError
from soko.platform.crypto import DataKeys, canonical_email, canonical_phone
from soko.platform.jobs import JobContext
from soko.platform.outbox import OutboxMessage, describe_failure
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.notifications")

SUPPRESSED_ERROR = "suppressed: the recipient bounced or was reported invalid before"


def recipient_index(keys: DataKeys, kind: NotificationKind, address: str) -> str:
    """The blind index of a recipient in its canonical form (lowercased email, E.164)."""
    if kind is NotificationKind.sms:
        return keys.blind_index.compute("notifications.phone", canonical_phone(address))
    return keys.blind_index.compute("notifications.email", canonical_email(address))


def new_delivery(
    notification: Notification, keys: DataKeys, user_id: uuid.UUID | None = None
) -> Delivery:
    return Delivery(
        id=notification.id,
        kind=notification.kind.value,
        category=notification.category,
        channel=notification.kind.value,
        status=DeliveryStatus.queued.value,
        recipient_index=recipient_index(keys, notification.kind, notification.to),
        user_id=user_id,
        attempts=0,
        created_at=notification.created_at,
        updated_at=notification.created_at,
    )


async def is_suppressed(session: AsyncSession, kind: NotificationKind, index: str) -> bool:
    found = await session.scalar(
        select(Suppression.id).where(
            Suppression.kind == kind.value, Suppression.address_index == index
        )
    )
    return found is not None


async def suppress(
    session: AsyncSession,
    *,
    kind: NotificationKind,
    index: str,
    reason: str,
    provider: str | None,
    now: dt.datetime,
) -> None:
    """Mark a recipient so nothing is sent to it again; a second mark is a no-op (a
    savepoint keeps a concurrent writer's duplicate from failing the transaction)."""
    if await is_suppressed(session, kind, index):
        return
    try:
        async with session.begin_nested():
            session.add(
                Suppression(
                    kind=kind.value,
                    address_index=index,
                    reason=reason[:200],
                    provider=provider,
                    created_at=now,
                )
            )
            await session.flush()
    except Exception as exc:  # a unique violation: someone marked it meanwhile
        if not await is_suppressed(session, kind, index):
            raise exc


def _error(text: str | None) -> str | None:
    if text is None:
        return None
    return text if len(text) <= LAST_ERROR_MAX_LENGTH else text[: LAST_ERROR_MAX_LENGTH - 1] + "…"


async def deliver(ctx: JobContext, notification: Notification) -> None:
    """The delivery job's work for one notification (see the module's docstring)."""
    runtime: Runtime = ctx.services
    session = ctx.session
    now = ctx.now()
    keys = runtime.data_keys
    # Locked (PostgreSQL) until the job commits, so a provider report arriving while the
    # provider is being called waits for the status this job writes.
    record = await session.get(Delivery, notification.id, with_for_update=True)
    if record is None:  # queued before delivery records existed
        record = new_delivery(notification, keys)
        session.add(record)
    elif record.status != DeliveryStatus.queued.value:
        log.info("delivery already settled", notification_id=str(notification.id))
        return
    previous_error = await session.scalar(
        select(OutboxMessage.last_error).where(OutboxMessage.id == ctx.message_id)
    )
    record.attempts = ctx.attempt
    record.last_error = _error(previous_error)
    record.updated_at = now

    kind = notification.kind
    if await is_suppressed(session, kind, record.recipient_index):
        record.status = DeliveryStatus.undeliverable.value
        record.last_error = SUPPRESSED_ERROR
        log.info("recipient suppressed; not sent", notification_id=str(notification.id))
        return

    services = provider_services(runtime)
    channel: Channel = configured_channel(runtime.settings, kind, services)
    record.provider = channel.provider
    try:
        sent = await _send(runtime, channel, notification)
    except RecipientRejected as exc:
        record.status = DeliveryStatus.undeliverable.value
        record.last_error = _error(describe_failure(exc))
        await suppress(
            session,
            kind=kind,
            index=record.recipient_index,
            reason=str(exc),
            provider=channel.provider,
            now=now,
        )
        return
    except PermanentFailure as exc:
        record.status = DeliveryStatus.failed.value
        record.last_error = _error(describe_failure(exc))
        return
    except Exception as exc:
        if ctx.attempt >= runtime.settings.outbox_max_attempts:
            record.status = DeliveryStatus.failed.value
            record.last_error = _error(describe_failure(exc))
            log.error("notification not delivered; giving up", notification_id=str(notification.id))
            return
        raise
    record.status = (DeliveryStatus.delivered if sent.delivered else DeliveryStatus.sent).value
    record.provider_message_id = sent.provider_message_id
    record.sent_at = now
    if sent.delivered:
        record.delivered_at = now


def _counts_against_provider(exc: BaseException) -> bool:
    # A permanent refusal is the provider answering: it is up.
    return not isinstance(exc, PermanentFailure)


async def _send(runtime: Runtime, channel: Channel, notification: Notification) -> Sent:
    """Through the provider's rate limit and circuit breaker; the file sink needs
    neither."""
    if channel.provider == "file":
        return await channel.deliver(notification)
    refused = await runtime.limiter.refusal(
        parse(runtime.settings.notifications_provider_rate_limit),
        "notifications.provider",
        channel.provider,
    )
    if refused is not None:
        raise TransientFailure(
            f"{channel.provider} rate limit reached; {refused.retry_after}s to wait"
        )
    breaker = provider_services(runtime).breaker(channel.provider)
    try:
        return await breaker.call(
            lambda: _deliver_in_time(runtime, channel, notification),
            counts_as_failure=_counts_against_provider,
        )
    except CircuitOpenError as exc:
        raise TransientFailure(
            f"{channel.provider} circuit open; next try in {exc.retry_after_seconds:.0f}s"
        ) from None


async def _deliver_in_time(runtime: Runtime, channel: Channel, notification: Notification) -> Sent:
    """The provider's call, bounded as a whole by ``notifications_http_timeout_seconds``.
    The HTTP client's timeout bounds each phase and each read apart, and SMTP's each
    command: a provider answering a byte at a time would otherwise hold the job's
    transaction, and the delivery's row, past the database's idle-in-transaction limit."""
    limit = runtime.settings.notifications_http_timeout_seconds
    try:
        async with asyncio.timeout(limit):
            return await channel.deliver(notification)
    except TimeoutError:
        raise TransientFailure(f"{channel.provider} took longer than {limit:g}s") from None


# -- provider reports -------------------------------------------------------------------------


async def apply_report(
    session: AsyncSession,
    *,
    delivery_id: uuid.UUID | None = None,
    kind: NotificationKind | None = None,
    provider: str,
    provider_message_id: str | None = None,
    status: DeliveryStatus,
    error: str | None,
    now: dt.datetime,
) -> Delivery | None:
    """Move the delivery a provider reported on; only forwards. Returns the delivery,
    or ``None`` when none matches (a report for another system, or one that came before
    the delivery job committed the provider's id: see docs/notifications.md).

    SendGrid echoes our id (``delivery_id``, with ``kind``): that finds the record even
    while its delivery job is still running, whose row lock (PostgreSQL) then holds this
    update until the job commits. The others are found by the provider's message id.
    Each try is a conditional update on the status just read; when another writer moved
    the record meanwhile, it is read again, so a report is never lost to a race and
    never moves a record backwards."""
    if delivery_id is not None:
        query = select(Delivery).where(Delivery.id == delivery_id)
        if kind is not None:
            query = query.where(Delivery.kind == kind.value)
    elif provider_message_id:
        query = select(Delivery).where(
            Delivery.provider == provider, Delivery.provider_message_id == provider_message_id
        )
    else:
        return None
    values: dict[str, object] = {"status": status.value, "updated_at": now}
    if error is not None:
        values["last_error"] = _error(error)
    if status is DeliveryStatus.delivered:
        values["delivered_at"] = now
    for _ in range(3):
        record = (
            await session.scalars(query.limit(1).execution_options(populate_existing=True))
        ).first()
        if record is None:
            return None
        current = DeliveryStatus(record.status)
        if STATUS_RANK[status] <= STATUS_RANK[current]:
            return record
        result = await session.execute(
            update(Delivery)
            .where(Delivery.id == record.id, Delivery.status == current.value)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0):
            break
    else:
        return None
    await session.refresh(record)
    if status is DeliveryStatus.undeliverable:
        await suppress(
            session,
            kind=NotificationKind(record.kind),
            index=record.recipient_index,
            reason=error or "reported undeliverable",
            provider=provider,
            now=now,
        )
    return record
