"""The rules of webhook endpoints: who owns them, their secrets, the fan-out of events
into deliveries, and manual redelivery. Takes a session, flushes, never commits.

Delivery itself (the HTTP attempt, the retry schedule, disabling) is in
:mod:`soko.webhooks.delivery`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from soko.platform.config import Settings
from soko.platform.db import dialect_insert
from soko.platform.errors import NotFound, ValidationFailed
from soko.platform.ids import uuid7
from soko.platform.netguard import UnsafeUrlError, check_url
from soko.platform.outbox import enqueue
from soko.platform.runtime import Runtime
from soko.webhooks.errors import WebhookEndpointDisabled, WebhookEndpointLimit, WebhookUrlRefused
from soko.webhooks.event_types import EVENT_OWNERS, EVENT_TYPES
from soko.webhooks.models import (
    PREVIOUS_SECRET_COLUMN,
    SECRET_COLUMN,
    DeliveryStatus,
    WebhookDelivery,
    WebhookEndpoint,
)
from soko.webhooks.signing import new_secret

DELIVER_JOB = "webhooks.deliver"
#: The subscriber name of the fan-out on every event type webhooks offer.
FAN_OUT_SUBSCRIBER = "webhooks.fan_out"
MAX_ENDPOINTS_PER_OWNER = 20
REDELIVER_BATCH_MAX = 1000


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose endpoints a request manages: a store's (``seller_id``) or, with
    ``seller_id`` ``None``, the marketplace's own; ``user_id`` is who acts."""

    seller_id: uuid.UUID | None
    user_id: uuid.UUID


# -- urls and event types --------------------------------------------------------------


def http_allowed(settings: Settings) -> bool:
    """Plain http is never allowed in production, whatever the setting says."""
    return settings.webhooks_allow_http and not settings.is_production


def checked_url(settings: Settings, url: str) -> str:
    """``url`` if the marketplace may call it, else ``webhook-url-refused`` (422). Names
    are resolved and checked again at every attempt."""
    try:
        check_url(
            url,
            allow_http=http_allowed(settings),
            allow_private=settings.webhooks_allow_private_addresses,
        )
    except UnsafeUrlError as exc:
        raise WebhookUrlRefused(f"The URL {exc}.", field="url") from None
    return url


def checked_event_types(event_types: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(event_types))
    if not wanted:
        raise ValidationFailed.of_field("event_types", "name at least one event type")
    unknown = [name for name in wanted if name not in EVENT_OWNERS]
    if unknown:
        raise ValidationFailed.of_field(
            "event_types",
            f"unknown event types {unknown}; known: {', '.join(EVENT_TYPES)}",
        )
    return sorted(wanted)


# -- secrets -----------------------------------------------------------------------------


def _seal(runtime: Runtime, secret: str, column: str, endpoint_id: uuid.UUID) -> str:
    return runtime.data_keys.keyring.encrypt(secret, context=f"{column}:{endpoint_id}")


def _open(runtime: Runtime, ciphertext: str, column: str, endpoint_id: uuid.UUID) -> str:
    return runtime.data_keys.keyring.decrypt(ciphertext, context=f"{column}:{endpoint_id}")


def signing_secrets(runtime: Runtime, endpoint: WebhookEndpoint, now: dt.datetime) -> list[str]:
    """The secrets that sign a message sent now: the current one, and the one before the
    last rotation while its overlap lasts."""
    secrets = [_open(runtime, endpoint.secret_ciphertext, SECRET_COLUMN, endpoint.id)]
    if (
        endpoint.previous_secret_ciphertext is not None
        and endpoint.previous_secret_until is not None
        and now < endpoint.previous_secret_until
    ):
        secrets.append(
            _open(runtime, endpoint.previous_secret_ciphertext, PREVIOUS_SECRET_COLUMN, endpoint.id)
        )
    return secrets


# -- endpoints -----------------------------------------------------------------------------


def _owned_by(scope: Scope) -> Any:
    if scope.seller_id is None:
        return WebhookEndpoint.seller_id.is_(None)
    return WebhookEndpoint.seller_id == scope.seller_id


def endpoints_query(scope: Scope) -> Any:
    return select(WebhookEndpoint).where(_owned_by(scope))


async def endpoint_for(
    session: AsyncSession, scope: Scope, endpoint_id: uuid.UUID, *, lock: bool = False
) -> WebhookEndpoint:
    """The scope's endpoint ``endpoint_id``; another owner's answers 404 like a missing
    one. ``lock`` holds its row until the transaction ends (PostgreSQL)."""
    statement = select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, _owned_by(scope))
    if lock:
        statement = statement.with_for_update()
    endpoint = (await session.scalars(statement)).one_or_none()
    if endpoint is None:
        raise NotFound("No such webhook endpoint.")
    return endpoint


async def create_endpoint(
    session: AsyncSession,
    runtime: Runtime,
    scope: Scope,
    *,
    url: str,
    event_types: Sequence[str],
    description: str = "",
) -> tuple[WebhookEndpoint, str]:
    """A new enabled endpoint and its secret, which is shown this once."""
    url = checked_url(runtime.settings, url)
    types = checked_event_types(event_types)
    count = await session.scalar(
        select(func.count()).select_from(WebhookEndpoint).where(_owned_by(scope))
    )
    if int(count or 0) >= MAX_ENDPOINTS_PER_OWNER:
        raise WebhookEndpointLimit(
            f"At most {MAX_ENDPOINTS_PER_OWNER} endpoints.", limit=MAX_ENDPOINTS_PER_OWNER
        )
    now = runtime.clock.now()
    endpoint_id = uuid7()
    secret = new_secret()
    endpoint = WebhookEndpoint(
        id=endpoint_id,
        seller_id=scope.seller_id,
        url=url,
        description=description,
        event_types=types,
        enabled=True,
        secret_ciphertext=_seal(runtime, secret, SECRET_COLUMN, endpoint_id),
        created_by=scope.user_id,
        created_at=now,
        updated_at=now,
        version=1,
    )
    session.add(endpoint)
    await session.flush()
    return endpoint, secret


async def update_endpoint(
    session: AsyncSession,
    runtime: Runtime,
    endpoint: WebhookEndpoint,
    *,
    url: str | None = None,
    event_types: Sequence[str] | None = None,
    description: str | None = None,
    enabled: bool | None = None,
) -> WebhookEndpoint:
    """Change what was given. Enabling a disabled endpoint forgets its failures, so it
    starts afresh; its failed deliveries can then be redelivered."""
    now = runtime.clock.now()
    if url is not None:
        endpoint.url = checked_url(runtime.settings, url)
    if event_types is not None:
        endpoint.event_types = checked_event_types(event_types)
    if description is not None:
        endpoint.description = description
    if enabled is not None and enabled != endpoint.enabled:
        endpoint.enabled = enabled
        if enabled:
            endpoint.disabled_reason = None
            endpoint.disabled_at = None
            endpoint.failing_since = None
            await kick(session, endpoint.id, f"enabled:{endpoint.id}:{endpoint.version}", now)
        else:
            endpoint.disabled_reason = "disabled by its owner"
            endpoint.disabled_at = now
    endpoint.updated_at = now
    endpoint.version += 1
    await session.flush()
    return endpoint


async def delete_endpoint(session: AsyncSession, endpoint: WebhookEndpoint) -> None:
    """Gone with its deliveries and log; a job still queued for it finds nothing."""
    await session.delete(endpoint)
    await session.flush()


async def rotate_secret(
    session: AsyncSession, runtime: Runtime, endpoint: WebhookEndpoint
) -> tuple[str, dt.datetime]:
    """A new secret, shown this once; the current one keeps signing beside it until the
    returned time. A second rotation within the overlap drops the oldest secret."""
    now = runtime.clock.now()
    current = _open(runtime, endpoint.secret_ciphertext, SECRET_COLUMN, endpoint.id)
    until = now + dt.timedelta(hours=runtime.settings.webhooks_secret_overlap_hours)
    secret = new_secret()
    endpoint.previous_secret_ciphertext = _seal(
        runtime, current, PREVIOUS_SECRET_COLUMN, endpoint.id
    )
    endpoint.previous_secret_until = until
    endpoint.secret_ciphertext = _seal(runtime, secret, SECRET_COLUMN, endpoint.id)
    endpoint.updated_at = now
    endpoint.version += 1
    await session.flush()
    return secret, until


# -- fan-out -------------------------------------------------------------------------------


def event_time(payload: Mapping[str, Any], fallback: dt.datetime) -> dt.datetime:
    """When the event happened, from its payload's own time when it has one."""
    for field in ("at", "placed_at", "occurred_at"):
        raw = payload.get(field)
        if isinstance(raw, str):
            try:
                moment = dt.datetime.fromisoformat(raw)
            except ValueError:
                continue
            if moment.tzinfo is not None:
                return moment.astimezone(dt.UTC)
    return fallback


@lru_cache(maxsize=1)
def _candidates_statement() -> Any:
    """The enabled endpoints that may see an event: the marketplace's, and those of the
    stores in ``owners`` (expanding; may be empty). Built once: every event runs it."""
    endpoints: Any = WebhookEndpoint.__table__
    return (
        select(endpoints.c.id, endpoints.c.seller_id, endpoints.c.event_types)
        .where(
            endpoints.c.enabled.is_(True),
            or_(
                endpoints.c.seller_id.is_(None),
                endpoints.c.seller_id.in_(bindparam("owners", expanding=True)),
            ),
        )
        .order_by(endpoints.c.id)
    )


@lru_cache(maxsize=1)
def _any_enabled_statement() -> Any:
    endpoints: Any = WebhookEndpoint.__table__
    return select(exists().where(endpoints.c.enabled.is_(True)))


async def any_endpoint_enabled(connection: AsyncConnection, _event_type: str) -> bool:
    """Whether any endpoint, the marketplace's or a store's, is enabled: without one no
    event needs fanning out (asked by the dispatcher before it queues the fan-out)."""
    return bool(await connection.scalar(_any_enabled_statement()))


async def fan_out(
    session: AsyncSession,
    *,
    event_id: uuid.UUID,
    event_type: str,
    payload: Mapping[str, Any],
    now: dt.datetime,
) -> int:
    """One delivery per enabled endpoint that subscribed to ``event_type`` and may see
    it: the marketplace's, and those of the stores the event concerns. Idempotent on
    (event, endpoint). Returns how many deliveries were written now."""
    rule = EVENT_OWNERS.get(event_type)
    if rule is None:
        return 0
    owners = rule.owners(payload)
    candidates = (await session.execute(_candidates_statement(), {"owners": list(owners)})).all()
    created_at = event_time(payload, now)
    written = 0
    insert = dialect_insert(session)
    for endpoint_id, seller_id, event_types in candidates:
        if event_type not in (event_types or ()):
            continue
        delivery_id = uuid7()
        statement = (
            insert(WebhookDelivery)
            .values(
                id=delivery_id,
                endpoint_id=endpoint_id,
                event_id=event_id,
                event_type=event_type,
                event_created_at=created_at,
                data=rule.data_for(payload, seller_id),
                status=DeliveryStatus.pending.value,
                # Event ids are UUIDv7, time-ordered as published: the queue follows
                # the order of publication, whatever order the fan-outs ran in.
                queue_key=event_id,
                attempts=0,
                retry_step=0,
                next_attempt_at=now,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["endpoint_id", "event_id"])
            .returning(WebhookDelivery.id)
        )
        if (await session.execute(statement)).scalar_one_or_none() is None:
            continue  # this event reached this endpoint already
        written += 1
        await kick(session, endpoint_id, f"new:{delivery_id}", now)
    return written


async def kick(
    session: AsyncSession,
    endpoint_id: uuid.UUID,
    reason: str,
    now: dt.datetime,
    *,
    at: dt.datetime | None = None,
) -> None:
    """Ask for the endpoint's queue to be worked (at ``at``, or now). ``reason`` makes
    the job's dedupe key: the same reason never queues a second job."""
    await enqueue(
        session,
        DELIVER_JOB,
        {"endpoint_id": str(endpoint_id)},
        available_at=at or now,
        dedupe_key=f"{DELIVER_JOB}:{reason}",
        now=now,
    )


# -- redelivery -----------------------------------------------------------------------------


def _require_enabled(endpoint: WebhookEndpoint) -> None:
    if not endpoint.enabled:
        raise WebhookEndpointDisabled("Enable the endpoint before redelivering to it.")


async def delivery_for(
    session: AsyncSession, endpoint: WebhookEndpoint, delivery_id: uuid.UUID
) -> WebhookDelivery:
    delivery = (
        await session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint.id)
            .with_for_update()
        )
    ).one_or_none()
    if delivery is None:
        raise NotFound("No such delivery for this endpoint.")
    return delivery


def _requeue(delivery: WebhookDelivery, now: dt.datetime) -> None:
    if delivery.status != DeliveryStatus.pending.value:
        # A finished delivery goes to the back of the queue, as a new round.
        delivery.queue_key = uuid7()
        delivery.status = DeliveryStatus.pending.value
        delivery.completed_at = None
    delivery.retry_step = 0
    delivery.next_attempt_at = now
    delivery.last_error = None


async def redeliver(
    session: AsyncSession, runtime: Runtime, endpoint: WebhookEndpoint, delivery_id: uuid.UUID
) -> WebhookDelivery:
    """Send the delivery's event again, with the same ``webhook-id``: a finished one
    joins the back of the endpoint's queue; a pending one becomes due now."""
    _require_enabled(endpoint)
    now = runtime.clock.now()
    delivery = await delivery_for(session, endpoint, delivery_id)
    _requeue(delivery, now)
    await session.flush()
    await kick(session, endpoint.id, f"redeliver:{delivery.id}:{uuid7()}", now)
    return delivery


async def redeliver_failed_since(
    session: AsyncSession, runtime: Runtime, endpoint: WebhookEndpoint, since: dt.datetime
) -> tuple[int, bool]:
    """Requeue the endpoint's failed deliveries of events since ``since``, oldest first,
    at most :data:`REDELIVER_BATCH_MAX` of them. Returns (how many, whether more are
    left for another call)."""
    _require_enabled(endpoint)
    now = runtime.clock.now()
    rows = (
        await session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_id == endpoint.id,
                WebhookDelivery.status == DeliveryStatus.failed.value,
                WebhookDelivery.created_at >= since,
            )
            .order_by(WebhookDelivery.queue_key)
            .limit(REDELIVER_BATCH_MAX + 1)
            .with_for_update()
        )
    ).all()
    chosen = rows[:REDELIVER_BATCH_MAX]
    for delivery in chosen:
        _requeue(delivery, now)
    await session.flush()
    if chosen:
        await kick(session, endpoint.id, f"redeliver-failed:{endpoint.id}:{uuid7()}", now)
    return len(chosen), len(rows) > REDELIVER_BATCH_MAX


async def fail_pending(
    session: AsyncSession, endpoint_id: uuid.UUID, now: dt.datetime, why: str
) -> int:
    """Give up the endpoint's pending deliveries (it was disabled): they stay in the log
    as failed, ready for a redelivery once it is enabled again."""
    result = await session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint_id,
            WebhookDelivery.status == DeliveryStatus.pending.value,
        )
        .values(status=DeliveryStatus.failed.value, completed_at=now, last_error=why)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
