"""In-app notifications: stored per user, listed, counted, marked read, and pushed.

Adding one writes the row and a push job in the caller's transaction; the job publishes
``{"type": "notification", ...}`` on the user's realtime channel (:func:`user_channel`)
once it commits. The push is at most once to whoever is connected (see
:mod:`soko.platform.realtime`); the row is the record, so a client that reconnects
reloads its list and unread count.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.models import InboxNotification
from soko.platform.db import dialect_insert
from soko.platform.ids import uuid7
from soko.platform.jobs import JobContext, registry
from soko.platform.outbox import session_now
from soko.platform.realtime import PubSub, publish_after_commit
from soko.platform.runtime import Runtime

PUSH_JOB = "notifications.push_in_app"
TITLE_MAX_LENGTH = 200
BODY_MAX_LENGTH = 4000


def user_channel(user_id: uuid.UUID) -> str:
    """The realtime channel a user's clients subscribe to for their notifications."""
    return f"user:{user_id}:notifications"


# Built once: every in-app notification runs both.
_INBOX: Any = InboxNotification.__table__


@lru_cache(maxsize=2)
def _insert_statement(dialect: str) -> Any:
    """Insert a notification (every column a bind parameter), or nothing when the user
    already had one with its dedupe key."""
    insert = dialect_insert(dialect)
    return (
        insert(_INBOX)
        .on_conflict_do_nothing(index_elements=["user_id", "dedupe_key"])
        .returning(_INBOX.c.id)
    )


@lru_cache(maxsize=1)
def _unread_statement() -> Any:
    return (
        select(func.count())
        .select_from(_INBOX)
        .where(_INBOX.c.user_id == bindparam("user_id"), _INBOX.c.read_at.is_(None))
    )


@lru_cache(maxsize=1)
def _insert_and_count_statement() -> Any:
    """PostgreSQL: :func:`_insert_statement` and the user's unread count with it in one
    round trip, ``(id, unread)`` or no row. The count reads the table as the statement
    began, without the row it inserts (unread, so one more)."""
    inserted = (
        dialect_insert("postgresql")(_INBOX)
        .values({column.name: bindparam(column.name, type_=column.type) for column in _INBOX.c})
        .on_conflict_do_nothing(index_elements=["user_id", "dedupe_key"])
        .returning(_INBOX.c.id)
        .cte("inserted")
    )
    unread = _unread_statement().scalar_subquery() + 1
    return select(inserted.c.id, unread.label("unread"))


async def add_to_inbox(
    session: AsyncSession,
    *,
    pubsub: PubSub | None,
    user_id: uuid.UUID,
    category: str,
    title: str,
    body: str,
    link: str | None = None,
    data: dict[str, Any] | None = None,
    dedupe_key: str | None = None,
) -> uuid.UUID | None:
    """Store an in-app notification for ``user_id`` and push it on ``pubsub`` (when
    given) once the transaction commits, with the user's unread count as of this
    transaction; ``None`` (nothing written) when ``dedupe_key`` was used for them
    before."""
    now = session_now(session)
    values: dict[str, Any] = {
        "id": uuid7(),
        "user_id": user_id,
        "category": category,
        "title": title[:TITLE_MAX_LENGTH],
        "body": body[:BODY_MAX_LENGTH],
        "link": link,
        "data": data or {},
        "dedupe_key": dedupe_key,
        "created_at": now,
        "read_at": None,
    }
    dialect = session.get_bind().dialect.name
    if pubsub is not None and dialect == "postgresql":
        # The row and the unread count to push with it, in one round trip.
        row = (await session.execute(_insert_and_count_statement(), values)).first()
        if row is None:
            return None
        inserted, unread = row
    else:
        inserted = (await session.execute(_insert_statement(dialect), values)).scalar_one_or_none()
        if inserted is None:
            return None
        unread = await unread_count(session, user_id) if pubsub is not None else 0
    if pubsub is not None:
        publish_after_commit(session, pubsub, user_channel(user_id), push_message(values, unread))
    return uuid.UUID(str(inserted))


_PUSHED_FIELDS = ("id", "category", "title", "body", "link", "created_at")


def push_message(fields: Mapping[str, Any], unread: int) -> dict[str, Any]:
    """What a connected client is sent about a new notification, from the values it was
    inserted with (or its row's)."""
    created_at: dt.datetime = fields["created_at"]
    return {
        "type": "notification",
        "id": str(fields["id"]),
        "category": fields["category"],
        "title": fields["title"],
        "body": fields["body"],
        "link": fields["link"],
        "created_at": created_at.isoformat(),
        "unread_count": unread,
    }


# Notifications are pushed after their transaction commits (add_to_inbox) rather than by
# this job; it stays registered for the pushes queued before that change.
@registry.job(PUSH_JOB, max_attempts=3)
async def push_in_app(ctx: JobContext, payload: dict[str, Any]) -> None:
    runtime: Runtime = ctx.services
    row = await ctx.session.get(InboxNotification, uuid.UUID(str(payload["id"])))
    if row is None or row.read_at is not None:
        return  # deleted with its user, or read elsewhere before the push went out
    unread = await unread_count(ctx.session, row.user_id)
    fields = {name: getattr(row, name) for name in _PUSHED_FIELDS}
    await runtime.pubsub.publish(user_channel(row.user_id), push_message(fields, unread))


async def unread_count(session: AsyncSession, user_id: uuid.UUID) -> int:
    count = await session.scalar(_unread_statement(), {"user_id": user_id})
    return int(count or 0)


async def mark_read(
    session: AsyncSession, user_id: uuid.UUID, notification_id: uuid.UUID, now: dt.datetime
) -> bool:
    """Mark one of the user's notifications read; False when it is not theirs. Marking
    a read one again keeps its first time."""
    owned = await session.scalar(
        select(InboxNotification.id).where(
            InboxNotification.id == notification_id, InboxNotification.user_id == user_id
        )
    )
    if owned is None:
        return False
    await session.execute(
        update(InboxNotification)
        .where(InboxNotification.id == notification_id, InboxNotification.read_at.is_(None))
        .values(read_at=now)
        .execution_options(synchronize_session=False)
    )
    return True


async def mark_all_read(
    session: AsyncSession,
    user_id: uuid.UUID,
    now: dt.datetime,
    *,
    up_to_id: uuid.UUID | None = None,
    before: dt.datetime | None = None,
) -> int:
    """Mark the user's unread notifications read, up to and including ``up_to_id``
    (the newest one a client showed) and created at or before ``before``; both
    optional. Those that arrive meanwhile stay unread. Returns how many were marked."""
    statement = update(InboxNotification).where(
        InboxNotification.user_id == user_id, InboxNotification.read_at.is_(None)
    )
    if up_to_id is not None:
        statement = statement.where(InboxNotification.id <= up_to_id)
    if before is not None:
        statement = statement.where(InboxNotification.created_at <= before)
    result = await session.execute(
        statement.values(read_at=now).execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
