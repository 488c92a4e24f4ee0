"""Retention: scheduled jobs that delete finished short-lived rows.

Each domain purges its own tables from a module ``soko.<domain>.retention`` (loaded with
the handlers); this module holds the shared pieces and the outbox's own purge. What is
kept and for how long is listed in docs/operations.md ("Retention").

Every purge deletes in bounded batches: a statement picks at most ``limit`` ids by a
subquery ordered along an index (``LIMIT``) and deletes those, checking the same
conditions again, so one run never holds a long lock (SQLite has a single writer) and a
row that changed meanwhile (a webhook delivery sent again) is left alone. A run whose
batch came back full asks for another run at once (:func:`continue_purge`), in a
transaction of its own, up to :data:`MAX_ROUNDS` per scheduled time; the next tick of
the schedule goes on from there.

The outbox (:func:`purge_outbox`): ``done`` messages older than
``SOKO_OUTBOX_RETENTION_DAYS`` and ``dead`` ones older than the longer of that and
``SOKO_RETENTION_DAYS`` go, with the processed markers (``processed_messages``) they
carry. A marker names (handler, message): the job's own id, or the published event's id
for each subscriber. It makes an effect happen once, so it goes only when no message
that carries it can run again: with the message whose deletion frees it, and never while
a pending or running message could still look it up (the event's own row, run in place,
or the subscriber's delivery row, found by its dedupe key). The message of each
schedule's most recent due time stays too: it is what tells a starting worker that this
due time already ran.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import structlog
from sqlalchemy import Column, ColumnElement, Row, Table, delete, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from soko.platform.jobs import JobContext, JobRegistry, registry
from soko.platform.outbox import (
    MessageKind,
    MessageStatus,
    OutboxMessage,
    ProcessedMessage,
    enqueue,
)

log = structlog.get_logger("soko.retention")

# Runs one scheduled time may take (each a transaction of its own) before leaving the
# rest to the next tick.
MAX_ROUNDS = 20
OUTBOX_PURGE_JOB = "platform.outbox.purge"
OUTBOX_BATCH = 500
# Marker keys per DELETE: two parameters each, well inside every driver's limit.
MARKER_CHUNK = 500

_OUTBOX = cast(Table, OutboxMessage.__table__)
_PROCESSED = cast(Table, ProcessedMessage.__table__)
_RUNNABLE = (MessageStatus.pending.value, MessageStatus.running.value)


def days(count: int) -> dt.timedelta:
    return dt.timedelta(days=count)


async def purge_batch(
    session: AsyncSession,
    table: Table,
    conditions: Sequence[ColumnElement[bool]],
    *,
    order_by: Sequence[ColumnElement[Any]],
    limit: int,
    returning: Sequence[ColumnElement[Any]] = (),
) -> list[Row[Any]]:
    """Delete up to ``limit`` rows of ``table`` that meet every one of ``conditions``,
    picked in ``order_by`` order (an index's, so the pick reads a range of it); the
    deleted rows' ``id`` and ``returning`` columns."""
    picked = select(table.c.id).where(*conditions).order_by(*order_by).limit(limit)
    statement = (
        delete(table)
        # The conditions again: a row changed since it was picked is left alone.
        .where(table.c.id.in_(picked.scalar_subquery()), *conditions)
        .returning(table.c.id, *returning)
    )
    return list((await session.execute(statement)).all())


async def purge_each(
    session: AsyncSession,
    table: Table,
    condition_sets: Iterable[Sequence[ColumnElement[bool]]],
    *,
    order_by: Sequence[ColumnElement[Any]],
    limit: int,
) -> tuple[int, bool]:
    """:func:`purge_batch` once for each set of conditions (one per status, say, each a
    range of its own of a ``(status, time)`` index); (deleted, whether a batch came back
    full, so more may wait)."""
    deleted = 0
    full = False
    for conditions in condition_sets:
        rows = await purge_batch(session, table, conditions, order_by=order_by, limit=limit)
        deleted += len(rows)
        full = full or len(rows) >= limit
    return deleted, full


class Purge(Protocol):
    """A purge: delete what ended before ``now - keep``; (deleted, whether more may wait)."""

    def __call__(
        self, session: AsyncSession, now: dt.datetime, *, keep: dt.timedelta
    ) -> Awaitable[tuple[int, bool]]: ...


def purge_schedule(
    cron: str, name: str, *, what: str, keep_days: str = "retention_days"
) -> Callable[[Purge], Purge]:
    """Register the decorated purge as the scheduled job ``name``: it keeps the number of
    days the setting ``keep_days`` says, logs how many ``what`` it deleted, and asks for
    another run while a batch comes back full (:func:`continue_purge`)."""

    def register(purge: Purge) -> Purge:
        @registry.schedule(cron, name=name)
        async def job(ctx: JobContext, payload: dict[str, Any]) -> None:
            keep = days(getattr(ctx.services.settings, keep_days))
            deleted, full = await purge(ctx.session, ctx.now(), keep=keep)
            if deleted:
                log.info(f"{what} purged", job=name, count=deleted)
            await continue_purge(ctx, name, payload, more=full)

        return purge

    return register


async def delete_where_in(session: AsyncSession, column: Column[Any], values: Iterable[Any]) -> int:
    """Delete the rows of ``column``'s table whose ``column`` is one of ``values`` (a
    batch already bounded by its caller); how many went."""
    wanted = list(values)
    if not wanted:
        return 0
    result = await session.execute(
        delete(column.table).where(column.in_(wanted)).execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def continue_purge(ctx: JobContext, job: str, payload: dict[str, Any], *, more: bool) -> bool:
    """When ``more`` rows may be waiting, ask for another run of ``job`` at once (in its
    own transaction, after this one commits), unless this scheduled time already had
    :data:`MAX_ROUNDS`; whether one was asked for."""
    round_ = int(payload.get("round", 1))
    if not more or round_ >= MAX_ROUNDS:
        return False
    scheduled_for = payload.get("scheduled_for")
    follow_up = {"scheduled_for": scheduled_for, "round": round_ + 1}
    dedupe_key = f"{job}:{scheduled_for}:{round_ + 1}" if scheduled_for else None
    await enqueue(ctx.session, job, follow_up, dedupe_key=dedupe_key, now=ctx.now())
    return True


# -- the outbox ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxPurged:
    messages: int
    markers: int
    full: bool


def _delivery_key(event_id: uuid.UUID, subscriber: str) -> str:
    """The dedupe key of ``subscriber``'s delivery of event ``event_id``, as the
    dispatcher writes it when it fans an event out (``soko.platform.jobs``)."""
    return f"event:{event_id}:{subscriber}"


def _latest_schedule_keys(jobs: JobRegistry, now: dt.datetime) -> list[str]:
    """The dedupe keys of each schedule's most recent due time, as the dispatcher writes
    them (``Dispatcher.fire_due_schedules``): a starting worker fires that due time
    unless its message exists, so it stays however old (a schedule due less often than
    the retention window would otherwise run twice)."""
    return [
        f"schedule:{schedule.name}:{schedule.latest_due(now).isoformat()}"
        for schedule in jobs.schedules.values()
    ] or ["-"]


def _marker_keys(rows: Iterable[Row[Any]], jobs: JobRegistry) -> set[tuple[str, uuid.UUID]]:
    """The markers the deleted outbox ``rows`` carried: a job's (its name, its id); a
    delivery's (its subscriber, its event); a published event's (each subscriber of its
    name, its id), left by a subscriber that ran it in place."""
    keys: set[tuple[str, uuid.UUID]] = set()
    for row in rows:
        if row.kind == MessageKind.job.value:
            keys.add((row.name, row.id))
        elif row.handler is not None and row.event_id is not None:
            keys.add((row.handler, row.event_id))
        else:
            keys.update((subscriber.name, row.id) for subscriber in jobs.subscribers(row.name))
    return keys


async def _still_carried(
    session: AsyncSession, keys: set[tuple[str, uuid.UUID]]
) -> set[tuple[str, uuid.UUID]]:
    """The ``keys`` a pending or running message may still look up: the message itself
    (a job, or an event a subscriber runs in place) or the subscriber's delivery of it."""
    carried: set[tuple[str, uuid.UUID]] = set()
    ordered = sorted(keys, key=lambda key: (key[0], str(key[1])))
    for start in range(0, len(ordered), MARKER_CHUNK):
        chunk = ordered[start : start + MARKER_CHUNK]
        by_delivery = {
            _delivery_key(message, handler): (handler, message) for handler, message in chunk
        }
        messages = {message for _, message in chunk}
        rows = await session.execute(
            select(_OUTBOX.c.id, _OUTBOX.c.dedupe_key).where(
                _OUTBOX.c.status.in_(_RUNNABLE),
                or_(_OUTBOX.c.id.in_(list(messages)), _OUTBOX.c.dedupe_key.in_(list(by_delivery))),
            )
        )
        for message_id, dedupe_key in rows:
            carried.update(key for key in chunk if key[1] == message_id)
            if dedupe_key in by_delivery:
                carried.add(by_delivery[dedupe_key])
    return carried


async def _delete_markers(session: AsyncSession, keys: set[tuple[str, uuid.UUID]]) -> int:
    deleted = 0
    ordered = sorted(keys, key=lambda key: (key[0], str(key[1])))
    for start in range(0, len(ordered), MARKER_CHUNK):
        chunk = ordered[start : start + MARKER_CHUNK]
        result = await session.execute(
            delete(_PROCESSED)
            .where(tuple_(_PROCESSED.c.handler, _PROCESSED.c.message_id).in_(chunk))
            .execution_options(synchronize_session=False)
        )
        deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted


async def purge_outbox(
    session: AsyncSession,
    now: dt.datetime,
    *,
    done_for: dt.timedelta,
    dead_for: dt.timedelta,
    jobs: JobRegistry,
    limit: int = OUTBOX_BATCH,
) -> OutboxPurged:
    """Delete up to ``limit`` done messages finished more than ``done_for`` ago and up to
    ``limit`` dead ones finished more than ``dead_for`` ago, with the markers only they
    carried. Pending and running messages, and the markers they may look up, stay.

    The pick reads the ``(status, available_at)`` index the claim uses: a message is
    claimed only once it is available, so it finished after ``available_at``, and the
    finish time is checked as well. The message of each schedule's latest due time
    stays (:func:`_latest_schedule_keys`)."""
    deleted: list[Row[Any]] = []
    full = False
    latest_runs = _latest_schedule_keys(jobs, now)
    for status, keep in ((MessageStatus.done, done_for), (MessageStatus.dead, dead_for)):
        cutoff = now - keep
        rows = await purge_batch(
            session,
            _OUTBOX,
            [
                _OUTBOX.c.status == status.value,
                _OUTBOX.c.available_at < cutoff,
                _OUTBOX.c.completed_at < cutoff,
                or_(_OUTBOX.c.dedupe_key.is_(None), _OUTBOX.c.dedupe_key.not_in(latest_runs)),
            ],
            order_by=[_OUTBOX.c.available_at],
            limit=limit,
            returning=[_OUTBOX.c.kind, _OUTBOX.c.name, _OUTBOX.c.handler, _OUTBOX.c.event_id],
        )
        deleted.extend(rows)
        full = full or len(rows) >= limit
    keys = _marker_keys(deleted, jobs)
    if keys:
        keys -= await _still_carried(session, keys)
    markers = await _delete_markers(session, keys) if keys else 0
    return OutboxPurged(messages=len(deleted), markers=markers, full=full)


@registry.schedule("5 * * * *", name=OUTBOX_PURGE_JOB)
async def purge_outbox_job(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Hourly: forget finished outbox messages and their markers (see the module)."""
    settings = ctx.services.settings
    jobs: JobRegistry = getattr(ctx.services, "registry", None) or registry
    purged = await purge_outbox(
        ctx.session,
        ctx.now(),
        done_for=days(settings.outbox_retention_days),
        dead_for=days(max(settings.outbox_retention_days, settings.retention_days)),
        jobs=jobs,
        limit=OUTBOX_BATCH,
    )
    if purged.messages or purged.markers:
        log.info("outbox purged", messages=purged.messages, markers=purged.markers)
    await continue_purge(ctx, OUTBOX_PURGE_JOB, payload, more=purged.full)
