"""Sending deliveries: one endpoint's queue, one attempt at a time, on a schedule.

The job ``webhooks.deliver`` (payload ``{"endpoint_id"}``) works one endpoint's queue:
it locks the endpoint's row, takes the *head* (the pending delivery with the lowest
``queue_key``), and if the head is due, makes one HTTP attempt and records it. What
follows is written in the same transaction as the attempt's record, and commits with
the job's completion:

* 2xx: the delivery succeeded; the endpoint is healthy again; the next head is queued
  at once.
* anything else (a non-2xx status, a redirect, a timeout, a refused address): the
  delivery is retried after the next step of :data:`RETRY_SCHEDULE`; after its last
  step it has failed and the next head is queued. An endpoint that has failed for
  ``webhooks_disable_after_hours`` with no success in between is disabled, its pending
  deliveries are given up and its owners emailed.

Order: an endpoint never has two attempts in flight (the row lock), and a delivery is
attempted only when every delivery queued before it has succeeded or failed for good.
So events reach an endpoint in the order their deliveries were queued, and a retried
event holds back the later ones until it succeeds or runs out of retries.

At least once: the HTTP request is made inside the job's transaction. If the worker dies
before that transaction commits, nothing of the attempt is recorded, the job's lease
runs out and another worker makes the attempt again, with the same ``webhook-id``.
Receivers de-duplicate on that id.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

import structlog
from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.public import contacts_of, user_ids_with_role
from soko.notifications.public import send_email
from soko.platform.ids import uuid7
from soko.platform.jobs import JobContext
from soko.platform.netguard import (
    BlockedAddressError,
    GuardedHttp,
    HttpAnswer,
    OutboundHttpError,
    system_resolver,
)
from soko.platform.outbox import MessageKind, MessageStatus, OutboxMessage
from soko.platform.runtime import Runtime
from soko.sellers.public import SellerRole, member_role, member_user_ids
from soko.webhooks.models import (
    ERROR_MAX_LENGTH,
    RESPONSE_EXCERPT_MAX_LENGTH,
    AttemptTrigger,
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from soko.webhooks.service import (
    DELIVER_JOB,
    FAN_OUT_SUBSCRIBER,
    fail_pending,
    kick,
    signing_secrets,
)
from soko.webhooks.signing import signature_header

log = structlog.get_logger("soko.webhooks")

#: How long after failed attempt number n (1-based) the next one is made: ten attempts
#: over about three days (75 h 35 min from the first to the last).
RETRY_SCHEDULE: tuple[dt.timedelta, ...] = (
    dt.timedelta(seconds=5),
    dt.timedelta(minutes=5),
    dt.timedelta(minutes=30),
    dt.timedelta(hours=2),
    dt.timedelta(hours=5),
    dt.timedelta(hours=10),
    dt.timedelta(hours=14),
    dt.timedelta(hours=20),
    dt.timedelta(hours=24),
)
MAX_ATTEMPTS_PER_ROUND = len(RETRY_SCHEDULE) + 1
USER_AGENT = "Soko-Webhooks/1"
ADMIN_ROLE = "admin"
#: How long the head of a queue waits for the fan-out of an earlier event.
FAN_OUT_WAIT = dt.timedelta(seconds=1)
HTTP_EXTENSION = "webhooks.http"
#: Tests put a resolver here (``async (host, port) -> [addresses]``) before the first
#: delivery; production resolves through the operating system.
RESOLVER_EXTENSION = "webhooks.resolver"


def next_retry(attempt_in_round: int) -> dt.timedelta | None:
    """The wait after failed attempt ``attempt_in_round`` (1-based), or ``None`` when it
    was the last of the round."""
    if 1 <= attempt_in_round <= len(RETRY_SCHEDULE):
        return RETRY_SCHEDULE[attempt_in_round - 1]
    return None


def http_client(runtime: Runtime) -> GuardedHttp:
    """The runtime's guarded HTTP client, made on first use and closed when it stops."""
    client = runtime.extensions.get(HTTP_EXTENSION)
    if isinstance(client, GuardedHttp):
        return client
    settings = runtime.settings
    client = GuardedHttp(
        allow_private=settings.webhooks_allow_private_addresses,
        timeout=settings.webhooks_timeout_seconds,
        max_response_bytes=settings.webhooks_response_max_bytes,
        resolver=runtime.extensions.get(RESOLVER_EXTENSION, system_resolver),
    )
    runtime.extensions[HTTP_EXTENSION] = client
    runtime.on_stop(client.aclose)
    return client


def envelope_body(delivery: WebhookDelivery) -> bytes:
    """The request body: the stable envelope, the same bytes at every attempt."""
    envelope = {
        "id": str(delivery.event_id),
        "type": delivery.event_type,
        "created_at": delivery.event_created_at.isoformat().replace("+00:00", "Z"),
        "data": delivery.data,
    }
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


def webhook_id(delivery: WebhookDelivery) -> str:
    """The ``webhook-id``: the event's id, the same at every attempt and redelivery (and
    for every endpoint the event reaches)."""
    return f"evt_{delivery.event_id.hex}"


async def deliver_next(ctx: JobContext, payload: dict[str, Any]) -> None:
    """The ``webhooks.deliver`` job: one attempt at the head of one endpoint's queue."""
    runtime: Runtime = ctx.services
    session = ctx.session
    endpoint_id = uuid.UUID(str(payload["endpoint_id"]))
    endpoint = (
        await session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id).with_for_update()
        )
    ).one_or_none()
    if endpoint is None or not endpoint.enabled:
        return  # deleted or disabled: its queue waits (or went with it)
    head = await _head(session, endpoint_id)
    now = ctx.now()
    if head is None or head.next_attempt_at > now:
        return  # nothing due: a retry has its own job at its time
    blocked_until = await _earlier_events_not_fanned_out(session, endpoint, head, now)
    if blocked_until is not None:
        # An event published before the head has not been turned into deliveries yet
        # (another worker is on it, or it waits for a retry): it may be for this
        # endpoint and must go first. Look again then; its fan-out also kicks. Jobs that
        # find the same wait share one follow-up (the key names the second).
        await kick(
            session,
            endpoint_id,
            f"wait:{endpoint_id}:{blocked_until.isoformat()}",
            now,
            at=blocked_until,
        )
        return
    manual = head.retry_step == 0 and head.attempts > 0
    attempt = WebhookAttempt(
        id=uuid7(),
        delivery_id=head.id,
        endpoint_id=endpoint_id,
        event_id=head.event_id,
        event_type=head.event_type,
        attempt=head.attempts + 1,
        cause=(AttemptTrigger.manual if manual else AttemptTrigger.scheduled).value,
        at=now,
    )
    began = time.perf_counter()
    answer, error = await _send(runtime, endpoint, head, attempt.id, now)
    succeeded = answer is not None and 200 <= answer.status < 300
    attempt.succeeded = succeeded
    attempt.status_code = answer.status if answer is not None else None
    seconds = answer.seconds if answer is not None else time.perf_counter() - began
    attempt.duration_ms = round(seconds * 1000)
    if answer is not None and not succeeded:
        error = f"HTTP {answer.status}"
        if 300 <= answer.status < 400:
            error += " (redirects are not followed)"
    attempt.error = error[:ERROR_MAX_LENGTH] if error else None
    attempt.response_excerpt = _excerpt(answer)
    session.add(attempt)
    head.attempts += 1
    head.retry_step += 1
    head.last_status_code = attempt.status_code
    head.last_error = attempt.error
    log.info(
        "webhook attempt",
        endpoint_id=str(endpoint_id),
        delivery_id=str(head.id),
        event_type=head.event_type,
        attempt=head.attempts,
        status_code=attempt.status_code,
        succeeded=succeeded,
        error=attempt.error,
    )
    if succeeded:
        head.status = DeliveryStatus.succeeded.value
        head.completed_at = now
        endpoint.failing_since = None
        endpoint.last_success_at = now
        await _queue_next(ctx, endpoint_id, head, now)
        return
    endpoint.failing_since = endpoint.failing_since or now
    disable_after = dt.timedelta(hours=runtime.settings.webhooks_disable_after_hours)
    wait = next_retry(head.retry_step)
    if now - endpoint.failing_since >= disable_after:
        head.status = DeliveryStatus.failed.value
        head.completed_at = now
        await session.flush()
        await _disable(session, runtime, endpoint, now)
        return
    if wait is None:
        head.status = DeliveryStatus.failed.value
        head.completed_at = now
        await _queue_next(ctx, endpoint_id, head, now)
        return
    head.next_attempt_at = now + wait
    await kick(
        session, endpoint_id, f"retry:{head.id}:{head.attempts}", now, at=head.next_attempt_at
    )


async def _queue_next(
    ctx: JobContext, endpoint_id: uuid.UUID, done: WebhookDelivery, now: dt.datetime
) -> None:
    """Queue the next head now, if there is one and no other job of this endpoint's is
    due or running. That job will find the head: a running one has not yet taken the
    endpoint's row, which this transaction holds (a job that held it has committed, and
    its completion with it), and a due one has not started. A delivery queued after
    this check has its own job, which waits for the row and then finds it."""
    session = ctx.session
    await session.flush()
    if await _head(session, endpoint_id) is None:
        return
    other = await session.scalar(
        select(OutboxMessage.id)
        .where(
            OutboxMessage.kind == MessageKind.job.value,
            OutboxMessage.name == DELIVER_JOB,
            OutboxMessage.id != ctx.message_id,
            or_(
                and_(
                    OutboxMessage.status == MessageStatus.pending.value,
                    OutboxMessage.available_at <= now,
                ),
                OutboxMessage.status == MessageStatus.running.value,
            ),
            OutboxMessage.payload["endpoint_id"].as_string() == str(endpoint_id),
        )
        .limit(1)
    )
    if other is None:
        await kick(session, endpoint_id, f"after:{done.id}:{done.attempts}", now)


async def _earlier_events_not_fanned_out(
    session: AsyncSession, endpoint: WebhookEndpoint, head: WebhookDelivery, now: dt.datetime
) -> dt.datetime | None:
    """``None`` when no event of a type the endpoint takes, published before the head
    was queued, still waits in the outbox to be fanned out (as published, or as the
    fan-out subscriber's own delivery); else when to look again: the next whole second,
    or the blocking message's retry time when that is later. Dead messages do not
    count: they will never arrive."""
    live = (MessageStatus.pending.value, MessageStatus.running.value)
    blocker = (
        await session.execute(
            select(OutboxMessage.status, OutboxMessage.available_at)
            .where(
                OutboxMessage.kind == MessageKind.event.value,
                OutboxMessage.status.in_(live),
                OutboxMessage.name.in_(list(endpoint.event_types)),
                or_(
                    and_(OutboxMessage.handler.is_(None), OutboxMessage.id < head.queue_key),
                    and_(
                        OutboxMessage.handler == FAN_OUT_SUBSCRIBER,
                        OutboxMessage.event_id < head.queue_key,
                    ),
                ),
            )
            .order_by(OutboxMessage.available_at)
            .limit(1)
        )
    ).first()
    if blocker is None:
        return None
    soon = (now + FAN_OUT_WAIT).replace(microsecond=0)
    retry_at: dt.datetime = blocker.available_at
    if blocker.status == MessageStatus.pending.value and retry_at > soon:
        return retry_at
    return soon


async def _head(session: AsyncSession, endpoint_id: uuid.UUID) -> WebhookDelivery | None:
    return (
        await session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_id == endpoint_id,
                WebhookDelivery.status == DeliveryStatus.pending.value,
            )
            .order_by(WebhookDelivery.queue_key)
            .limit(1)
        )
    ).one_or_none()


async def _send(
    runtime: Runtime,
    endpoint: WebhookEndpoint,
    delivery: WebhookDelivery,
    attempt_id: uuid.UUID,
    now: dt.datetime,
) -> tuple[HttpAnswer | None, str | None]:
    body = envelope_body(delivery)
    message_id = webhook_id(delivery)
    timestamp = int(now.timestamp())
    headers = [
        ("Content-Type", "application/json"),
        ("User-Agent", USER_AGENT),
        ("webhook-id", message_id),
        ("webhook-timestamp", str(timestamp)),
        (
            "webhook-signature",
            signature_header(
                signing_secrets(runtime, endpoint, now),
                message_id=message_id,
                timestamp=timestamp,
                body=body,
            ),
        ),
        ("X-Request-ID", str(attempt_id)),
    ]
    try:
        return await http_client(runtime).post(endpoint.url, headers=headers, body=body), None
    except BlockedAddressError as exc:
        return None, f"refused: {exc}"
    except OutboundHttpError as exc:
        return None, str(exc)


def _excerpt(answer: HttpAnswer | None) -> str | None:
    if answer is None or not answer.body:
        return None
    text = answer.body.decode("utf-8", errors="replace")
    limit = RESPONSE_EXCERPT_MAX_LENGTH - 1
    return text if len(text) <= limit and not answer.truncated else text[:limit] + "…"


async def _disable(
    session: AsyncSession, runtime: Runtime, endpoint: WebhookEndpoint, now: dt.datetime
) -> None:
    """Stop sending to a failing endpoint and tell the people who manage it."""
    assert endpoint.failing_since is not None
    hours = (now - endpoint.failing_since).total_seconds() / 3600
    endpoint.enabled = False
    endpoint.disabled_at = now
    endpoint.disabled_reason = f"failing for {hours:.0f} hours with no success"
    endpoint.updated_at = now
    endpoint.version += 1
    given_up = await fail_pending(session, endpoint.id, now, "the endpoint was disabled")
    log.warning(
        "webhook endpoint disabled",
        endpoint_id=str(endpoint.id),
        seller_id=str(endpoint.seller_id) if endpoint.seller_id else None,
        given_up=given_up,
    )
    people = await people_to_tell(session, endpoint)
    contacts = await contacts_of(session, runtime, people)
    for user_id in people:
        contact = contacts.get(user_id)
        if contact is None or not contact.email:
            continue
        await send_email(
            session,
            to=contact.email,
            subject="A webhook endpoint was disabled",
            text=_disabled_text(endpoint, hours),
            category="webhooks.endpoint_disabled",
            dedupe_key=f"webhooks.disabled:{endpoint.id}:{endpoint.version}:{user_id}",
        )


async def people_to_tell(session: AsyncSession, endpoint: WebhookEndpoint) -> list[uuid.UUID]:
    """Who is emailed when the endpoint is disabled: the store's owners, or for the
    marketplace's endpoint the administrator who registered it and every other."""
    if endpoint.seller_id is None:
        # The marketplace's own: the administrator who registered it, and every other.
        admins = await user_ids_with_role(session, ADMIN_ROLE)
        return list(dict.fromkeys([endpoint.created_by, *admins]))
    owners = []
    for user_id in await member_user_ids(session, endpoint.seller_id):
        if await member_role(session, endpoint.seller_id, user_id) == SellerRole.owner:
            owners.append(user_id)
    return owners


def _disabled_text(endpoint: WebhookEndpoint, hours: float) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint.url)
    # Scheme and host only: a path or query may carry the receiver's own token.
    where = f"{parts.scheme}://{parts.netloc}"
    return (
        f"The webhook endpoint {endpoint.id} ({where}) has been failing for {hours:.0f} "
        "hours with no successful delivery, so the marketplace stopped sending to it.\n\n"
        "Its deliveries that were still waiting are marked failed. Once the receiver "
        "works again, enable the endpoint (PATCH /api/v1/webhooks/endpoints/"
        f"{endpoint.id} with enabled: true) and redeliver what failed (POST "
        f"/api/v1/webhooks/endpoints/{endpoint.id}/redeliver-failed).\n"
    )
