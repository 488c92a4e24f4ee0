"""Background jobs, event handlers and scheduled jobs, run from the outbox.

Domains register handlers on a :class:`JobRegistry` (the module-level :data:`registry`
unless a test brings its own)::

    @registry.job("send_receipt")
    async def send_receipt(ctx: JobContext, payload: dict[str, Any]) -> None: ...

    @registry.on("order.paid", name="notify_buyer")
    async def notify_buyer(ctx: JobContext, payload: dict[str, Any]) -> None: ...

    @registry.schedule("*/5 * * * *", name="expire_carts")
    async def expire_carts(ctx: JobContext, payload: dict[str, Any]) -> None: ...

and write work with ``await enqueue(session, ...)`` / ``await publish(session, ...)``
(:mod:`soko.platform.outbox`) in their own transaction. A :class:`Dispatcher` claims
due outbox rows, runs each handler in one transaction together with its "processed"
marker and the row's completion, retries failures with exponential backoff and jitter,
and gives up ("dead") after the maximum number of attempts.

Delivery is at least once; effects happen once because a handler's writes, its marker
and the message's completion commit together. While a handler runs, its transaction
holds the message row (``FOR UPDATE`` on PostgreSQL, the write lock on SQLite), so a
live worker's job is never taken over; the lease only matters when a worker died. A
handler that calls out of the database (HTTP, email) must itself be safe to repeat,
for example by passing ``ctx.message_id`` as the provider's idempotency key.

A published event is fanned out by whichever dispatcher claims it, to the subscribers in
*its* registry: every process that dispatches must load every domain's handlers (the
app and ``soko worker`` do, through ``load_handlers``).

Handlers must not commit or roll back ``ctx.session``. On SQLite every handler
transaction holds the database's single write lock while it runs, so handlers there
should be short and must not open a second transaction of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, TypeVar

import structlog
from croniter import croniter
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import Integer, and_, bindparam, insert, select, text, union_all, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from soko.platform.cache import log_invalidation_failure
from soko.platform.clock import Clock
from soko.platform.config import Settings
from soko.platform.db import Database, database_unavailable, dialect_insert
from soko.platform.ids import uuid7
from soko.platform.outbox import (
    NAME_MAX_LENGTH,
    SESSION_CLOCK_KEY,
    MessageKind,
    MessageStatus,
    OutboxMessage,
    ProcessedMessage,
    add_message,
    describe_failure,
)

log = structlog.get_logger("soko.jobs")

JOBS_TOTAL = Counter(
    "soko_jobs_total",
    "Outbox messages handled, by job (or event:subscriber) and outcome",
    ["name", "outcome"],
)
JOB_DURATION = Histogram(
    "soko_job_duration_seconds",
    "Time one attempt of a handler took, failed or not",
    ["name"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
JOBS_CLAIMED = Gauge(
    "soko_jobs_claimed", "Outbox messages this process has claimed and not yet finished"
)

OUTCOME_DONE = "done"
OUTCOME_RETRY = "retry"
OUTCOME_DEAD = "dead"


@dataclass(frozen=True)
class JobContext:
    """What a handler gets besides its payload.

    ``session`` is the handler's transaction: its writes commit with the message's
    completion, or not at all. ``message_id`` identifies this delivery; for an event
    handler ``event_id`` is the id of the published event (the same for every
    subscriber). ``attempt`` counts from 1. ``services`` is the process's Runtime (cache,
    pub/sub, settings...), or whatever the dispatcher was given.
    """

    session: AsyncSession
    clock: Clock
    message_id: uuid.UUID
    attempt: int
    services: Any
    name: str
    event_id: uuid.UUID | None = None

    def now(self) -> dt.datetime:
        return self.clock.now()


JobHandler = Callable[[JobContext, dict[str, Any]], Awaitable[None]]
HandlerT = TypeVar("HandlerT", bound=JobHandler)
# Whether a subscriber wants an event now, asked on the connection of the transaction
# that fans the event out, with the event's name (see JobRegistry.on).
WantedCheck = Callable[[AsyncConnection, str], Awaitable[bool]]


@dataclass(frozen=True)
class JobDefinition:
    name: str
    handler: JobHandler
    max_attempts: int | None = None


@dataclass(frozen=True)
class Subscription:
    event: str
    name: str
    handler: JobHandler
    max_attempts: int | None = None
    wanted: WantedCheck | None = None


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str

    def latest_due(self, now: dt.datetime) -> dt.datetime:
        """The most recent time at or before ``now`` this schedule was due."""
        # croniter's get_prev is strictly before its start: nudge so "now" counts.
        start = now + dt.timedelta(microseconds=1)
        moment: dt.datetime = croniter(self.cron, start).get_prev(dt.datetime)
        return moment.astimezone(dt.UTC)

    def next_due(self, after: dt.datetime) -> dt.datetime:
        """The first time strictly after ``after`` this schedule is due."""
        moment: dt.datetime = croniter(self.cron, after).get_next(dt.datetime)
        return moment.astimezone(dt.UTC)


def _check_handler(handler: Callable[..., Any]) -> None:
    if not inspect.iscoroutinefunction(handler):
        raise TypeError(f"{handler!r} must be an async function (ctx, payload) -> None")


def _check_name(what: str, name: str) -> None:
    if not name or len(name) > NAME_MAX_LENGTH:
        raise ValueError(f"{what} must be 1 to {NAME_MAX_LENGTH} characters")


def _check_max_attempts(max_attempts: int | None) -> None:
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")


class JobRegistry:
    """The handlers one process knows: jobs by name, event subscriptions, schedules."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobDefinition] = {}
        self.subscriptions: dict[str, dict[str, Subscription]] = {}
        self.schedules: dict[str, Schedule] = {}

    def job(self, name: str, *, max_attempts: int | None = None) -> Callable[[HandlerT], HandlerT]:
        """Register ``async def handler(ctx, payload)`` as job ``name``."""
        _check_name("a job name", name)
        _check_max_attempts(max_attempts)

        def register(handler: HandlerT) -> HandlerT:
            _check_handler(handler)
            if name in self.jobs:
                raise ValueError(f"job {name!r} is already registered")
            self.jobs[name] = JobDefinition(name, handler, max_attempts)
            return handler

        return register

    def on(
        self,
        event: str,
        *,
        name: str | None = None,
        max_attempts: int | None = None,
        wanted: WantedCheck | None = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Subscribe ``async def handler(ctx, payload)`` to ``event`` under ``name``
        (default: the function's name). Each subscriber gets its own delivery: a message
        of its own, retried on its own; when it is the only subscriber that wants an
        event, the event's message is its delivery (no second message is written).

        ``wanted(connection, event)``, when given, is asked on the connection that fans
        the event out, right before it does; ``False`` means this subscriber gets no
        delivery of it (a subscriber with nothing to do for now, such as webhooks with no
        endpoint). It
        must be cheap, and answer ``True`` whenever the handler might have work: a
        wrong ``False`` loses the event for that subscriber. If it raises, the fan-out
        fails and is retried like any job."""
        _check_name("an event name", event)
        _check_max_attempts(max_attempts)

        def register(handler: HandlerT) -> HandlerT:
            _check_handler(handler)
            subscriber = name or handler.__name__
            _check_name("a subscriber name", subscriber)
            subscribers = self.subscriptions.setdefault(event, {})
            if subscriber in subscribers:
                raise ValueError(f"{event!r} already has a subscriber named {subscriber!r}")
            subscribers[subscriber] = Subscription(event, subscriber, handler, max_attempts, wanted)
            return handler

        return register

    def schedule(
        self, cron: str, *, name: str | None = None, max_attempts: int | None = None
    ) -> Callable[[HandlerT], HandlerT]:
        """Run ``async def handler(ctx, payload)`` at the times of the cron expression
        ``cron`` (UTC), once per due time across every worker. The payload is
        ``{"scheduled_for": "<ISO time>"}``. A worker that starts runs the most recent
        due time if no worker did; due times missed in between are coalesced into one."""
        if not croniter.is_valid(cron):
            raise ValueError(f"{cron!r} is not a valid cron expression")
        _check_max_attempts(max_attempts)

        def register(handler: HandlerT) -> HandlerT:
            schedule_name = name or f"{handler.__module__}.{handler.__qualname__}"
            self.job(schedule_name, max_attempts=max_attempts)(handler)
            self.schedules[schedule_name] = Schedule(schedule_name, cron)
            return handler

        return register

    def subscribers(self, event: str) -> list[Subscription]:
        return list(self.subscriptions.get(event, {}).values())


registry = JobRegistry()


@dataclass(frozen=True)
class ClaimedMessage:
    """An outbox row as this worker claimed it."""

    id: uuid.UUID
    kind: str
    name: str
    handler: str | None
    event_id: uuid.UUID | None
    payload: dict[str, Any]
    attempts: int
    max_attempts: int | None

    @property
    def is_published_event(self) -> bool:
        return self.kind == MessageKind.event and self.handler is None

    @property
    def label(self) -> str:
        """The name metrics and logs use: the job, or ``event:subscriber``."""
        if self.kind == MessageKind.event and self.handler is not None:
            return f"{self.name}:{self.handler}"
        return self.name


class LeaseLostError(Exception):
    """The message is no longer this worker's: its lease ran out and another took it."""


class UnknownHandlerError(Exception):
    """No handler is registered for the message in this process."""


_CLAIMED_COLUMNS = (
    OutboxMessage.id,
    OutboxMessage.kind,
    OutboxMessage.name,
    OutboxMessage.handler,
    OutboxMessage.event_id,
    OutboxMessage.payload,
    OutboxMessage.attempts,
    OutboxMessage.max_attempts,
)

# -- statements built once ------------------------------------------------------------------------
#
# Every message costs a claim, a hold, a completion and (for a handler) its marker, and
# an event's fan-out one row per subscriber. Built anew on each call, SQLAlchemy spent
# more CPU constructing these statements and computing their cache keys than running
# them, and that CPU is taken from the requests the same event loop serves. Built once
# with bind parameters, they run on the session's connection as plain Core statements.

_OUTBOX: Any = OutboxMessage.__table__
_PROCESSED: Any = ProcessedMessage.__table__


def _ours() -> Any:
    """The message is still this worker's, at this attempt: ``message_id``, ``worker``,
    ``attempts``."""
    return and_(
        _OUTBOX.c.id == bindparam("message_id"),
        _OUTBOX.c.status == MessageStatus.running.value,
        _OUTBOX.c.locked_by == bindparam("worker"),
        _OUTBOX.c.attempts == bindparam("attempts"),
    )


@lru_cache(maxsize=1)
def _claim_statement() -> Any:
    """Take up to ``limit`` due messages (running with a lease run out, then pending and
    due at ``now``) for ``worker`` until ``lease_until``.

    Each kind is its own range of an index read in order (``status, locked_until`` and
    ``status, available_at``), stopping after ``limit`` rows it could lock. One range
    for both (``pending and due or running and expired``, ordered by ``available_at``)
    let PostgreSQL combine the two indexes into a bitmap and sort it: every claim read
    every pending row, so its cost grew with the backlog it was there to drain (about
    600 buffers a claim while a checkout burst's events queued up), and a bitmap scan
    never marks the dead index entries of claimed rows, which each claim then visited
    again."""
    now = bindparam("now", type_=_OUTBOX.c.available_at.type)
    limit = bindparam("limit", type_=Integer)
    # SKIP LOCKED lets concurrent workers claim disjoint rows on PostgreSQL; SQLite omits
    # it, and BEGIN IMMEDIATE makes claims take turns there.
    expired = (
        select(_OUTBOX.c.id)
        .where(_OUTBOX.c.status == MessageStatus.running.value, _OUTBOX.c.locked_until < now)
        .order_by(_OUTBOX.c.locked_until)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("expired")
    )
    pending = (
        select(_OUTBOX.c.id)
        .where(_OUTBOX.c.status == MessageStatus.pending.value, _OUTBOX.c.available_at <= now)
        .order_by(_OUTBOX.c.available_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("pending")
    )
    candidates = union_all(select(expired.c.id), select(pending.c.id)).limit(limit)
    return (
        update(_OUTBOX)
        .where(_OUTBOX.c.id.in_(candidates))
        .values(
            status=MessageStatus.running.value,
            locked_by=bindparam("worker"),
            locked_until=bindparam("lease_until"),
            attempts=_OUTBOX.c.attempts + 1,
        )
        .returning(*(_OUTBOX.c[column.key] for column in _CLAIMED_COLUMNS))
    )


@lru_cache(maxsize=2)
def _hold_statement(with_marker: bool) -> Any:
    """Lock the message row if it is still ours (:func:`_ours`); ``with_marker`` also
    says, in the same round trip, whether ``marker_handler`` already finished
    ``marker_message``."""
    columns: list[Any] = [_OUTBOX.c.id]
    if with_marker:
        done_before = (
            select(_PROCESSED.c.id)
            .where(
                _PROCESSED.c.handler == bindparam("marker_handler"),
                _PROCESSED.c.message_id == bindparam("marker_message"),
            )
            .exists()
        )
        columns.append(done_before.label("done_before"))
    return select(*columns).where(_ours()).with_for_update(of=_OUTBOX)


@lru_cache(maxsize=1)
def _complete_statement() -> Any:
    return (
        update(_OUTBOX)
        .where(_OUTBOX.c.id == bindparam("message_id"))
        .values(
            status=MessageStatus.done.value,
            completed_at=bindparam("done_at"),
            locked_by=None,
            locked_until=None,
            last_error=None,
        )
    )


@lru_cache(maxsize=1)
def _marker_statement() -> Any:
    return insert(_PROCESSED)


@lru_cache(maxsize=1)
def _marker_and_complete_statement() -> Any:
    """PostgreSQL: the handler's marker and the message's completion in one round trip
    (``WITH marker AS (INSERT ...) UPDATE ...``): ``marker_id``, ``marker_handler``,
    ``marker_message``, ``message_id`` and ``done_at``. PostgreSQL runs a data-modifying
    ``WITH`` whether or not the statement reads it; SQLite has none, and runs the two
    statements."""
    marker = (
        insert(_PROCESSED)
        .values(
            id=bindparam("marker_id", type_=_PROCESSED.c.id.type),
            handler=bindparam("marker_handler", type_=_PROCESSED.c.handler.type),
            message_id=bindparam("marker_message", type_=_PROCESSED.c.message_id.type),
            processed_at=bindparam("done_at", type_=_PROCESSED.c.processed_at.type),
        )
        .cte("marker")
    )
    return _complete_statement().add_cte(marker)


@lru_cache(maxsize=2)
def _fan_out_statement(dialect: str) -> Any:
    """One delivery row per subscriber, each skipped if its dedupe key exists."""
    insert_ = dialect_insert(dialect)
    return insert_(_OUTBOX).on_conflict_do_nothing(index_elements=["dedupe_key"])


# PostgreSQL: an event's fan-out in one autocommitted statement. The event row is locked
# if it is still this worker's (``ours``: nothing else happens if not), one delivery row
# per subscriber is written with the event's name and payload copied from that row
# (skipped where its dedupe key exists), and the event is completed. SQLite has no
# data-modifying WITH and runs the same steps in a transaction.
_FAN_OUT_IN_ONE = text(
    """
    WITH ours AS (
        SELECT id, name, payload FROM outbox_messages
        WHERE id = :message_id AND status = :running AND locked_by = :worker
          AND attempts = :attempts
        FOR UPDATE
    ), fanned AS (
        INSERT INTO outbox_messages (id, kind, name, handler, event_id, payload, status,
            attempts, max_attempts, available_at, dedupe_key, created_at)
        SELECT delivery.id, CAST(:event_kind AS varchar), ours.name, delivery.handler, ours.id,
            ours.payload, CAST(:pending AS varchar), 0, delivery.max_attempts,
            CAST(:now AS timestamptz), delivery.dedupe_key, CAST(:now AS timestamptz)
        FROM ours, unnest(CAST(:ids AS uuid[]), CAST(:handlers AS varchar[]),
            CAST(:max_attempts AS integer[]), CAST(:dedupe_keys AS varchar[]))
            AS delivery(id, handler, max_attempts, dedupe_key)
        ON CONFLICT (dedupe_key) DO NOTHING
    ), completed AS (
        UPDATE outbox_messages SET status = :done, completed_at = CAST(:now AS timestamptz),
            locked_by = NULL, locked_until = NULL, last_error = NULL
        WHERE id IN (SELECT id FROM ours)
    )
    SELECT count(*) FROM ours
    """
)


def _delivered_in_place(event: ClaimedMessage, subscriber: Subscription) -> ClaimedMessage:
    """The published ``event``'s own message as ``subscriber``'s delivery: the handler
    and the marker are the subscriber's (:meth:`Dispatcher._run_handler` marks
    ``(handler, event_id)``), the row, its lease and its attempts the event's."""
    return replace(event, handler=subscriber.name, event_id=event.id)


def _delivery_key(event: ClaimedMessage, subscriber: Subscription) -> str:
    """The dedupe key of ``subscriber``'s delivery of ``event``: one delivery each,
    however often the event is fanned out."""
    return f"event:{event.id}:{subscriber.name}"


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid7().hex[-8:]}"[-NAME_MAX_LENGTH:]


class Dispatcher:
    """Claims due outbox messages and runs their handlers; see the module docstring."""

    def __init__(
        self,
        *,
        db: Database,
        settings: Settings,
        clock: Clock,
        registry: JobRegistry,
        services: Any = None,
        worker_id: str | None = None,
        rng: random.Random | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.registry = registry
        self.services = services
        self.worker_id = worker_id or default_worker_id()
        self._rng = rng or random.Random()
        # True while the process serves requests: new jobs then start only up to
        # ``outbox_busy_concurrency``, so a backlog does not crowd requests out of the
        # event loop they share (the API process dispatching in-process).
        self._busy = busy
        self._concurrency = asyncio.Semaphore(settings.outbox_concurrency)
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_done: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._held = 0
        self._want_more = False
        self._schedules_fired: dict[str, dt.datetime] = {}
        # When each fired schedule is next due: until then a poll need not ask croniter.
        self._schedules_next: dict[str, dt.datetime] = {}

    # -- control ---------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due messages now rather than at the next poll."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run(self) -> None:
        """Dispatch until :meth:`stop` is called."""
        self._loop_done = asyncio.Event()
        try:
            while not self._stopping:
                self._wake.clear()
                more = False
                try:
                    more = await self._poll_once()
                except Exception as exc:
                    unavailable = database_unavailable(exc)
                    if unavailable:
                        # An outage, not a bug: one line a poll, no traceback.
                        log.warning(
                            "outbox poll failed: database unavailable",
                            worker=self.worker_id,
                            error=unavailable,
                        )
                    else:
                        log.exception("outbox poll failed", worker=self.worker_id)
                if more or self._stopping:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.outbox_poll_seconds)
        finally:
            self._loop_done.set()

    def concurrency_now(self) -> int:
        """How many jobs may run at once now: ``outbox_concurrency``, or
        ``outbox_busy_concurrency`` while the process is serving requests."""
        limit = self.settings.outbox_concurrency
        if self._busy is not None and self._busy():
            return min(limit, self.settings.outbox_busy_concurrency)
        return limit

    async def _poll_once(self) -> bool:
        """Fire due schedules and start what fits; True when more may be waiting."""
        await self.fire_due_schedules()
        limit = self.concurrency_now()
        free = limit - len(self._tasks)
        self._want_more = False
        if free <= 0:
            self._want_more = True
            return False
        wanted = min(self.settings.outbox_batch_size, free)
        batch = await self.claim(wanted)
        if self._stopping:
            return False  # stop() releases what this claim took
        for message in batch:
            self._start(message)
        if len(batch) < wanted:
            return False
        # A full batch: claim again at once if slots are left, else when one frees up.
        self._want_more = len(self._tasks) >= limit
        return not self._want_more

    async def run_until_idle(self) -> int:
        """Handle everything due now (including handlers' follow-up messages that are due
        at once) and return how many messages were claimed. Retries scheduled for later
        are left for later."""
        claimed = 0
        while not self._stopping:
            await self.fire_due_schedules()
            batch = await self.claim(self.settings.outbox_batch_size)
            if not batch:
                break
            claimed += len(batch)
            if self.stopping:
                break  # stop() hands the batch back
            tasks = [self._start(message) for message in batch]
            await asyncio.gather(*tasks, return_exceptions=True)
        return claimed

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming; give running handlers up to ``grace`` seconds, cancel the rest,
        and hand everything still claimed back so another worker can take it at once."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._stopping = True
        self._wake.set()
        running = set(self._tasks)
        if running:
            _, unfinished = await asyncio.wait(running, timeout=max(grace, 0))
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        if self._loop_done is not None:
            await self._loop_done.wait()
        await self._release_claimed()

    # -- claiming --------------------------------------------------------------------

    async def claim(self, limit: int) -> list[ClaimedMessage]:
        """Take up to ``limit`` due messages: pending ones whose time has come and running
        ones whose lease ran out (their worker died). Each gets this worker's lease and
        one more attempt."""
        if limit <= 0:
            return []
        now = self.clock.now()
        parameters = {
            "now": now,
            "limit": limit,
            "worker": self.worker_id,
            "lease_until": now + dt.timedelta(seconds=self.settings.outbox_lease_seconds),
        }
        # One statement, whole on its own (its row locks last as long as it runs): on
        # PostgreSQL it needs no BEGIN and COMMIT around it.
        async with self.db.writing_once() as connection:
            rows = (await connection.execute(_claim_statement(), parameters)).all()
        claimed = [
            ClaimedMessage(
                id=row.id,
                kind=row.kind,
                name=row.name,
                handler=row.handler,
                event_id=row.event_id,
                payload=dict(row.payload or {}),
                attempts=row.attempts,
                max_attempts=row.max_attempts,
            )
            for row in rows
        ]
        if claimed:
            self._held += len(claimed)
            JOBS_CLAIMED.inc(len(claimed))
        return claimed

    def _start(self, message: ClaimedMessage) -> asyncio.Task[None]:
        task = asyncio.create_task(self.handle(message), name=f"outbox:{message.label}")
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._want_more:
            self._wake.set()

    async def _release_claimed(self) -> None:
        message = OutboxMessage
        try:
            async with self.db.transaction() as session:
                result = await session.execute(
                    update(message)
                    .where(
                        message.locked_by == self.worker_id,
                        message.status == MessageStatus.running,
                    )
                    .values(
                        status=MessageStatus.pending.value,
                        locked_by=None,
                        locked_until=None,
                        # The attempt never finished; it should not count against the job.
                        attempts=message.attempts - 1,
                    )
                    .execution_options(synchronize_session=False)
                )
        except Exception:
            log.exception("could not release claimed messages", worker=self.worker_id)
            return
        released = int(getattr(result, "rowcount", 0) or 0)
        if released:
            log.info("released claimed messages", worker=self.worker_id, count=released)
        if self._held:
            JOBS_CLAIMED.dec(self._held)
            self._held = 0

    # -- handling --------------------------------------------------------------------

    async def handle(self, message: ClaimedMessage) -> None:
        """Run one claimed message to its end: done, retry, dead, or lease lost."""
        with structlog.contextvars.bound_contextvars(
            job=message.label, message_id=str(message.id), attempt=message.attempts
        ):
            try:
                async with self._concurrency:
                    if self._stopping:
                        return  # not started yet: stop() hands it back
                    await self._attempt(message)
            finally:
                if self._held:
                    self._held -= 1
                    JOBS_CLAIMED.dec()

    async def _attempt(self, message: ClaimedMessage) -> None:
        began = time.perf_counter()
        try:
            if message.is_published_event:
                inline = await self._fan_out(message)
                if inline is not None:
                    # Its one subscriber's run, counted, retried and limited as its own.
                    message = inline
                    await self._run_handler(message)
            else:
                await self._run_handler(message)
        except LeaseLostError:
            log.warning("lease lost; another worker has the message")
            return
        except Exception as exc:
            JOB_DURATION.labels(message.label).observe(time.perf_counter() - began)
            await self._record_failure(message, exc)
            return
        JOB_DURATION.labels(message.label).observe(time.perf_counter() - began)
        JOBS_TOTAL.labels(message.label, OUTCOME_DONE).inc()

    def _ours(self, message: ClaimedMessage) -> dict[str, Any]:
        return {"message_id": message.id, "worker": self.worker_id, "attempts": message.attempts}

    async def _hold(
        self, session: AsyncSession, message: ClaimedMessage, marker: tuple[str, uuid.UUID] | None
    ) -> bool:
        """Lock the message row for this transaction, if it is still ours (else raise
        :class:`LeaseLostError`); with ``marker`` (handler, message id), whether that
        handler already finished that message."""
        parameters = self._ours(message)
        if marker is not None:
            parameters.update(marker_handler=marker[0], marker_message=marker[1])
        connection = await session.connection()
        held = (await connection.execute(_hold_statement(marker is not None), parameters)).first()
        if held is None:
            raise LeaseLostError(str(message.id))
        return marker is not None and bool(held[1])

    def _still_ours(self, message: ClaimedMessage) -> Any:
        return and_(
            OutboxMessage.id == message.id,
            OutboxMessage.status == MessageStatus.running,
            OutboxMessage.locked_by == self.worker_id,
            OutboxMessage.attempts == message.attempts,
        )

    async def _complete(self, session: AsyncSession, message: ClaimedMessage) -> None:
        connection = await session.connection()
        await connection.execute(
            _complete_statement(), {"message_id": message.id, "done_at": self.clock.now()}
        )

    async def _mark_and_complete(
        self,
        session: AsyncSession,
        message: ClaimedMessage,
        marker_handler: str,
        marker_message: uuid.UUID,
    ) -> None:
        """Record that ``marker_handler`` finished ``marker_message`` and complete the
        message, in the handler's transaction."""
        connection = await session.connection()
        now = self.clock.now()
        if connection.dialect.name == "postgresql":
            await connection.execute(
                _marker_and_complete_statement(),
                {
                    "marker_id": uuid7(),
                    "marker_handler": marker_handler,
                    "marker_message": marker_message,
                    "message_id": message.id,
                    "done_at": now,
                },
            )
            return
        await connection.execute(
            _marker_statement(),
            {
                "id": uuid7(),
                "handler": marker_handler,
                "message_id": marker_message,
                "processed_at": now,
            },
        )
        await self._complete(session, message)

    def _target(self, message: ClaimedMessage) -> tuple[JobHandler, int | None] | None:
        if message.kind == MessageKind.job:
            job = self.registry.jobs.get(message.name)
            return (job.handler, job.max_attempts) if job else None
        subscription = self.registry.subscriptions.get(message.name, {}).get(message.handler or "")
        return (subscription.handler, subscription.max_attempts) if subscription else None

    async def _run_handler(self, message: ClaimedMessage) -> None:
        target = self._target(message)
        # The marker names what was done once: this job message, or this event for this
        # subscriber (so even a second delivery row for one event has no second effect).
        marker_handler = message.handler or message.name
        marker_message = message.event_id or message.id
        async with self.db.sessionmaker() as session:
            session.info[SESSION_CLOCK_KEY] = self.clock
            async with session.begin():
                done_before = await self._hold(session, message, (marker_handler, marker_message))
                if target is None:
                    raise UnknownHandlerError(f"no handler is registered for {message.label!r}")
                if not done_before:
                    handler, _ = target
                    context = JobContext(
                        session=session,
                        clock=self.clock,
                        message_id=message.id,
                        attempt=message.attempts,
                        services=self.services,
                        name=message.label,
                        event_id=message.event_id,
                    )
                    await handler(context, message.payload)
                    await self._mark_and_complete(session, message, marker_handler, marker_message)
                else:
                    log.info("already processed; completing without running the handler")
                    await self._complete(session, message)
            wrote_outbox = bool(session.info.get("outbox_written"))
            # What the handler marked with runtime.invalidate_after_commit.
            tags: list[str] = session.info.pop("invalidate_tags", [])
        log.info("job done")
        cache = getattr(self.services, "cache", None)
        if tags and cache is not None:
            try:
                await cache.invalidate_tags(*tags)
            except Exception as exc:  # committed already; a cache outage must not hide that
                log_invalidation_failure(cache, exc, tags, "after a job")
        if wrote_outbox:
            self.wake()

    async def _wanting(
        self, connection: AsyncConnection, message: ClaimedMessage
    ) -> list[Subscription]:
        """The subscribers of the event ``message`` that want it (see ``wanted``)."""
        return [
            subscriber
            for subscriber in self.registry.subscribers(message.name)
            if subscriber.wanted is None or await subscriber.wanted(connection, message.name)
        ]

    async def _fan_out(self, message: ClaimedMessage) -> ClaimedMessage | None:
        """Hand the published event ``message`` to the subscribers that want it: one
        delivery message each, written as the event completes. When exactly one wants it
        (the usual case), no delivery is written: the event's own message becomes that
        subscriber's delivery, returned for the caller to run at once. Its marker is the
        one a delivery would have had (the subscriber, the event), so either way the
        subscriber's work is done once; a failed run retries the event, which asks again
        who wants it. That spares each such event a message written, claimed and
        completed: the fan-out statement, the delivery's share of a claim, and a row's three
        writes."""
        if self.db.dialect == "postgresql":
            return await self._fan_out_in_one(message)
        now = self.clock.now()
        async with self.db.transaction() as session:
            await self._hold(session, message, None)
            connection = await session.connection()
            subscribers = await self._wanting(connection, message)
            if len(subscribers) == 1:
                return _delivered_in_place(message, subscribers[0])
            if subscribers:
                # The payload was read back from the database: JSON already.
                deliveries = [
                    {
                        "id": uuid7(),
                        "kind": MessageKind.event.value,
                        "name": message.name,
                        "handler": subscriber.name,
                        "event_id": message.id,
                        "payload": message.payload,
                        "status": MessageStatus.pending.value,
                        "attempts": 0,
                        "max_attempts": subscriber.max_attempts,
                        "available_at": now,
                        "locked_by": None,
                        "locked_until": None,
                        "last_error": None,
                        "dedupe_key": _delivery_key(message, subscriber),
                        "created_at": now,
                        "completed_at": None,
                    }
                    for subscriber in subscribers
                ]
                await connection.execute(_fan_out_statement(connection.dialect.name), deliveries)
            await self._complete(session, message)
        log.info("event fanned out", subscribers=[s.name for s in subscribers])
        if subscribers:
            self.wake()
        return None

    async def _fan_out_in_one(self, message: ClaimedMessage) -> ClaimedMessage | None:
        """:meth:`_fan_out` on PostgreSQL: the subscribers that want the event, then one
        statement (:data:`_FAN_OUT_IN_ONE`) instead of a transaction of five round trips."""
        async with self.db.writing_once() as connection:
            subscribers = await self._wanting(connection, message)
            if len(subscribers) == 1:
                return _delivered_in_place(message, subscribers[0])
            held = await connection.scalar(
                _FAN_OUT_IN_ONE,
                {
                    **self._ours(message),
                    "running": MessageStatus.running.value,
                    "pending": MessageStatus.pending.value,
                    "done": MessageStatus.done.value,
                    "event_kind": MessageKind.event.value,
                    "now": self.clock.now(),
                    "ids": [uuid7() for _ in subscribers],
                    "handlers": [subscriber.name for subscriber in subscribers],
                    "max_attempts": [subscriber.max_attempts for subscriber in subscribers],
                    "dedupe_keys": [_delivery_key(message, s) for s in subscribers],
                },
            )
        if not held:
            raise LeaseLostError(str(message.id))
        log.info("event fanned out", subscribers=[s.name for s in subscribers])
        if subscribers:
            self.wake()
        return None

    def backoff(self, attempt: int) -> dt.timedelta:
        """How long to wait after failed attempt number ``attempt`` (1-based): doubling
        from the base up to the cap, then a random point in its upper half, so retries
        of many failed jobs spread out instead of arriving together."""
        base = self.settings.outbox_backoff_base_seconds
        cap = self.settings.outbox_backoff_max_seconds
        ceiling = min(cap, base * 2.0 ** min(max(attempt, 1) - 1, 64))
        return dt.timedelta(seconds=self._rng.uniform(ceiling / 2, ceiling))

    async def _record_failure(self, message: ClaimedMessage, exc: Exception) -> None:
        target = self._target(message)
        limit = (
            message.max_attempts
            or (target[1] if target else None)
            or self.settings.outbox_max_attempts
        )
        dead = message.attempts >= limit
        now = self.clock.now()
        values: dict[str, Any] = {
            "locked_by": None,
            "locked_until": None,
            "last_error": describe_failure(exc),
        }
        if dead:
            values.update(status=MessageStatus.dead.value, completed_at=now)
        else:
            values.update(
                status=MessageStatus.pending.value,
                available_at=now + self.backoff(message.attempts),
            )
        try:
            async with self.db.transaction() as session:
                result = await session.execute(
                    update(OutboxMessage)
                    .where(self._still_ours(message))
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
        except Exception:
            # The lease will run out and the message will be tried again.
            log.exception("could not record a failed attempt")
            return
        if not getattr(result, "rowcount", 0):
            log.warning("lease lost; another worker has the message")
            return
        outcome = OUTCOME_DEAD if dead else OUTCOME_RETRY
        JOBS_TOTAL.labels(message.label, outcome).inc()
        if dead:
            log.error(
                "job failed for the last time; giving up",
                error=values["last_error"],
                max_attempts=limit,
                exc_info=exc,
            )
        else:
            log.warning(
                "job failed; will retry",
                error=values["last_error"],
                retry_at=values["available_at"].isoformat(),
                exc_info=exc,
            )

    # -- schedules -------------------------------------------------------------------

    async def fire_due_schedules(self) -> None:
        """Enqueue each schedule's most recent due time, once across all workers: the
        dedupe key ``schedule:<name>:<due time>`` lets only the first writer through."""
        schedules: Sequence[Schedule] = list(self.registry.schedules.values())
        if not schedules:
            return
        now = self.clock.now()
        due = []
        for schedule in schedules:
            fired = self._schedules_fired.get(schedule.name)
            upcoming = self._schedules_next.get(schedule.name)
            if fired is not None and upcoming is not None and fired <= now < upcoming:
                continue
            at = schedule.latest_due(now)
            if fired != at:
                due.append((schedule, at))
        if not due:
            return
        async with self.db.transaction() as session:
            for schedule, at in due:
                job = self.registry.jobs.get(schedule.name)
                await add_message(
                    session,
                    kind=MessageKind.job,
                    name=schedule.name,
                    payload={"scheduled_for": at.isoformat()},
                    available_at=at,
                    created_at=now,
                    dedupe_key=f"schedule:{schedule.name}:{at.isoformat()}",
                    max_attempts=job.max_attempts if job else None,
                )
        for schedule, at in due:
            self._schedules_fired[schedule.name] = at
            self._schedules_next[schedule.name] = schedule.next_due(at)
