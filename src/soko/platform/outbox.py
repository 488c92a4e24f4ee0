"""The outbox: side effects written in the same transaction as the state change.

A domain never calls out (email, webhook, another domain's handler) from inside a
request. It writes an outbox row with :func:`enqueue` (a job) or :func:`publish` (an
event) through the session of the transaction that changes its state, so the effect
exists exactly when the change commits. The dispatcher in :mod:`soko.platform.jobs`
claims due rows and runs their handlers.

Rows of ``outbox_messages``:

* ``kind = job``: run the job handler registered under ``name``.
* ``kind = event`` with no ``handler``: an event as published. The dispatcher fans it out
  into one delivery row per subscriber and marks it done.
* ``kind = event`` with a ``handler``: one delivery of event ``name`` to that subscriber,
  retried on its own; ``event_id`` names the published event.

``processed_messages`` records which handler has finished which message, in the
handler's own transaction, so a message delivered twice has its effect once.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from enum import StrEnum
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    CheckConstraint,
    ColumnElement,
    Index,
    Insert,
    String,
    Text,
    UniqueConstraint,
    insert,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import (
    Base,
    UUIDPrimaryKey,
    dialect_insert,
    unnest_insert,
    unnest_parameters,
)
from soko.platform.ids import uuid7

NAME_MAX_LENGTH = 200
DEDUPE_KEY_MAX_LENGTH = 300
LAST_ERROR_MAX_LENGTH = 1000


class MessageKind(StrEnum):
    job = "job"
    event = "event"


class MessageStatus(StrEnum):
    pending = "pending"
    running = "running"
    done = "done"
    dead = "dead"


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


# JSONB on PostgreSQL (indexable, compact); plain JSON text on SQLite.
PayloadType = JSON().with_variant(postgresql.JSONB(), "postgresql")


class OutboxMessage(UUIDPrimaryKey, Base):
    """A job or an event waiting to be handled, being handled, or handled."""

    __tablename__ = "outbox_messages"
    __table_args__ = (
        CheckConstraint(_in("kind", MessageKind), name="kind"),
        CheckConstraint(_in("status", MessageStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint("max_attempts IS NULL OR max_attempts >= 1", name="max_attempts"),
        # The claim query: pending rows that are due, oldest first...
        Index("ix_outbox_messages_status_available_at", "status", "available_at"),
        # ...and running rows whose lease has run out.
        Index("ix_outbox_messages_status_locked_until", "status", "locked_until"),
    )

    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    handler: Mapped[str | None] = mapped_column(String(NAME_MAX_LENGTH), default=None)
    event_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    payload: Mapped[dict[str, Any]] = mapped_column(PayloadType)
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.pending.value)
    attempts: Mapped[int] = mapped_column(default=0)
    # NULL: the handler's registered limit, else the worker's SOKO_OUTBOX_MAX_ATTEMPTS.
    max_attempts: Mapped[int | None] = mapped_column(default=None)
    available_at: Mapped[dt.datetime]
    locked_by: Mapped[str | None] = mapped_column(String(NAME_MAX_LENGTH), default=None)
    locked_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    # Unique when set: at most one message ever carries a given key (NULLs never clash).
    dedupe_key: Mapped[str | None] = mapped_column(
        String(DEDUPE_KEY_MAX_LENGTH), unique=True, default=None
    )
    created_at: Mapped[dt.datetime]
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    def __repr__(self) -> str:  # the payload may hold personal data: never shown
        return f"<OutboxMessage {self.id} {self.kind} {self.name!r} {self.status}>"


class ProcessedMessage(UUIDPrimaryKey, Base):
    """Handler ``handler`` has finished message ``message_id``; written in the handler's
    transaction, so its effects and this row commit together or not at all."""

    __tablename__ = "processed_messages"
    __table_args__ = (UniqueConstraint("handler", "message_id"),)

    handler: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    message_id: Mapped[uuid.UUID]
    processed_at: Mapped[dt.datetime]


def _json_payload(payload: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    if isinstance(payload, BaseModel):
        dumped: dict[str, Any] = payload.model_dump(mode="json")
        return dumped
    try:
        # A round trip proves the payload is plain JSON now, not when the worker reads it.
        loaded: dict[str, Any] = json.loads(json.dumps(dict(payload)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"an outbox payload must be JSON: {exc}") from None
    return loaded


def _check_name(what: str, name: str) -> None:
    if not name or len(name) > NAME_MAX_LENGTH:
        raise ValueError(f"{what} must be 1 to {NAME_MAX_LENGTH} characters")


SESSION_CLOCK_KEY = "clock"


def session_now(session: AsyncSession, now: dt.datetime | None = None) -> dt.datetime:
    """``now`` if given, else the time of the clock stored in ``session.info["clock"]``
    (the dispatcher stores its clock there for handlers), else the system time."""
    if now is not None:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return now.astimezone(dt.UTC)
    clock = session.info.get(SESSION_CLOCK_KEY)
    if clock is not None:
        moment: dt.datetime = clock.now()
        return moment
    return dt.datetime.now(dt.UTC)


async def add_message(
    session: AsyncSession,
    *,
    kind: MessageKind,
    name: str,
    payload: Mapping[str, Any] | BaseModel,
    available_at: dt.datetime,
    created_at: dt.datetime,
    handler: str | None = None,
    event_id: uuid.UUID | None = None,
    dedupe_key: str | None = None,
    max_attempts: int | None = None,
) -> uuid.UUID | None:
    """Write one outbox row in ``session``'s transaction and return its id, or ``None``
    when a message with ``dedupe_key`` already exists (then nothing is written)."""
    if available_at.tzinfo is None or created_at.tzinfo is None:
        raise ValueError("outbox times must be timezone-aware")
    if dedupe_key is not None and not 0 < len(dedupe_key) <= DEDUPE_KEY_MAX_LENGTH:
        raise ValueError(f"a dedupe key must be 1 to {DEDUPE_KEY_MAX_LENGTH} characters")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    values: dict[str, Any] = {
        "id": uuid7(),
        "kind": kind.value,
        "name": name,
        "handler": handler,
        "event_id": event_id,
        "payload": _json_payload(payload),
        "status": MessageStatus.pending.value,
        "attempts": 0,
        "max_attempts": max_attempts,
        "available_at": available_at,
        "dedupe_key": dedupe_key,
        "created_at": created_at,
    }
    session.info["outbox_written"] = True
    if dedupe_key is None:
        session.add(OutboxMessage(**values))
        return uuid.UUID(str(values["id"]))
    # A duplicate must not fail the caller's transaction: insert-or-nothing in one
    # statement, which also settles two concurrent writers of the same key.
    insert = dialect_insert(session)
    statement = (
        insert(OutboxMessage)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(OutboxMessage.id)
    )
    inserted = (await session.execute(statement)).scalar_one_or_none()
    return inserted


async def enqueue(
    session: AsyncSession,
    name: str,
    payload: Mapping[str, Any] | BaseModel,
    *,
    delay: dt.timedelta | float | None = None,
    available_at: dt.datetime | None = None,
    dedupe_key: str | None = None,
    max_attempts: int | None = None,
    now: dt.datetime | None = None,
) -> uuid.UUID | None:
    """Ask for job ``name`` to run with ``payload`` once this transaction commits.

    The row joins ``session``'s transaction: if it rolls back, the job never existed.
    Payloads carry ids, not objects; handlers read the current state themselves.
    ``delay`` or ``available_at`` hold the job back; ``dedupe_key`` makes the call a
    no-op (returning ``None``) when a message with that key exists: any not yet
    finished, and finished ones until the retention purge deletes them
    (``SOKO_OUTBOX_RETENTION_DAYS``, :mod:`soko.platform.retention`), so a key must name
    something that does not come back after that.
    ``now`` is the caller's clock reading (see :func:`session_now` for the default).
    """
    _check_name("a job name", name)
    if delay is not None and available_at is not None:
        raise ValueError("give delay or available_at, not both")
    created = session_now(session, now)
    due = created
    if available_at is not None:
        if available_at.tzinfo is None:
            raise ValueError("available_at must be timezone-aware")
        due = available_at.astimezone(dt.UTC)
    elif delay is not None:
        due = created + (delay if isinstance(delay, dt.timedelta) else dt.timedelta(seconds=delay))
    return await add_message(
        session,
        kind=MessageKind.job,
        name=name,
        payload=payload,
        available_at=due,
        created_at=created,
        dedupe_key=dedupe_key,
        max_attempts=max_attempts,
    )


async def publish(
    session: AsyncSession,
    event_name: str,
    payload: Mapping[str, Any] | BaseModel,
    *,
    now: dt.datetime | None = None,
) -> uuid.UUID:
    """Publish event ``event_name`` (such as ``order.paid``) once this transaction commits.

    Every handler subscribed to the event gets its own delivery, retried on its own.
    """
    _check_name("an event name", event_name)
    created = session_now(session, now)
    message_id = await add_message(
        session,
        kind=MessageKind.event,
        name=event_name,
        payload=payload,
        available_at=created,
        created_at=created,
    )
    assert message_id is not None  # only a dedupe key can suppress a row
    return message_id


@lru_cache(maxsize=1)
def _insert_statement() -> Any:
    table: Any = OutboxMessage.__table__
    return insert(table)


async def publish_all(
    session: AsyncSession,
    event_name: str,
    payloads: Sequence[Mapping[str, Any] | BaseModel],
    *,
    now: dt.datetime | None = None,
) -> list[uuid.UUID]:
    """:func:`publish` ``event_name`` once per payload, in one statement written at once
    (not at the session's next flush): for a hot path that publishes several events of
    a kind, such as a checkout's one ``order.placed`` per order."""
    rows = event_rows(session, event_name, payloads, now=now)
    await write_event_rows(session, rows)
    return [row["id"] for row in rows]


async def write_event_rows(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Write rows made by :func:`event_rows`, in one statement."""
    if rows:
        await session.execute(_insert_statement(), rows)


def event_rows(
    session: AsyncSession,
    event_name: str,
    payloads: Sequence[Mapping[str, Any] | BaseModel],
    *,
    now: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """The rows :func:`publish_all` writes, for a caller that writes them itself: with
    :func:`write_event_rows`, or inside a statement of its own on PostgreSQL
    (:func:`publishing_insert`), which may run on another connection. The dispatcher is
    woken when ``session`` commits (a request's session does once the request succeeds,
    with or without changes of its own), else at its next poll."""
    _check_name("an event name", event_name)
    created = session_now(session, now)
    rows = [
        {
            "id": uuid7(),
            "kind": MessageKind.event.value,
            "name": event_name,
            "handler": None,
            "event_id": None,
            "payload": _json_payload(payload),
            "status": MessageStatus.pending.value,
            "attempts": 0,
            "max_attempts": None,
            "available_at": created,
            "locked_by": None,
            "locked_until": None,
            "last_error": None,
            "dedupe_key": None,
            "created_at": created,
            "completed_at": None,
        }
        for payload in payloads
    ]
    if rows:
        session.info["outbox_written"] = True
    return rows


def publishing_insert(prefix: str, *, where: ColumnElement[bool] | None = None) -> Insert:
    """PostgreSQL: an INSERT of :func:`event_rows` to embed in a larger statement (see
    :func:`soko.platform.db.unnest_insert`; its parameters come from
    :func:`publishing_parameters` with the same ``prefix``)."""
    table: Any = OutboxMessage.__table__
    return unnest_insert(table, prefix, where=where)


def publishing_parameters(prefix: str, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    table: Any = OutboxMessage.__table__
    return unnest_parameters(table, prefix, rows)


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?P<key>password|passwd|secret|token|api[_-]?key|authorization|otp)"
    r"(?P<sep>\s*[=:]\s*)(?P<value>\"[^\"]*\"|'[^']*'|\S+)"
)
_LONG_DIGITS = re.compile(r"\d(?:[ -]?\d){11,}")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def describe_failure(exc: BaseException) -> str:
    """A short account of ``exc`` fit to keep in the table: the exception type and its
    message, with credentials, secrets, card-like numbers and emails masked."""
    text = f"{type(exc).__name__}: {exc}"
    text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
    text = _SECRET_ASSIGNMENT.sub(r"\g<key>\g<sep>***", text)
    text = _EMAIL.sub("***@***", text)
    text = _LONG_DIGITS.sub("***", text)
    if len(text) > LAST_ERROR_MAX_LENGTH:
        text = text[: LAST_ERROR_MAX_LENGTH - 1] + "…"
    return text
