"""Re-encrypting personal data under the active key after an encryption key rotation.

An operator rotates by putting a new key first in ``SOKO_ENCRYPTION_KEYS`` (it becomes
the active key; the older ones keep decrypting) and asking for re-encryption with
``soko keys rotate``. That enqueues the ``identity.reencrypt`` job, which walks every
encrypted column of every domain (those declared in :mod:`soko.platform.encrypted`:
accounts' emails and phones, TOTP secrets, stores' payout details, webhook signing
secrets) in batches, one transaction per batch, and enqueues itself again with
its position until every value is under the active key.

Each value is replaced by a conditional ``UPDATE ... WHERE <column> = <the ciphertext
read>``: if the owner changed their email meanwhile, the update matches nothing and the
new value (already under whatever key its writer held) is left alone. So two rotations
running at once, or one run twice, never overwrite anything; the second one finds less
and less to do. Blind indexes have their own key and never move.

A value that cannot be decrypted (malformed, or under a key no longer configured) is
counted and skipped, never logged: ``soko keys status`` shows it under its key id.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final

import structlog
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from soko.identity.audit import record_audit_event
from soko.platform.clock import Clock
from soko.platform.crypto import CIPHERTEXT_VERSION, DecryptionError, Keyring
from soko.platform.encrypted import EncryptedColumn, encrypted_columns
from soko.platform.jobs import JobContext, registry
from soko.platform.outbox import enqueue

log = structlog.get_logger("soko.identity.keys")

REENCRYPT_JOB: Final = "identity.reencrypt"
DEFAULT_BATCH_SIZE: Final = 500
MAX_BATCH_SIZE: Final = 10_000

ACTION_ROTATION_REQUESTED: Final = "admin.encryption_rotation_requested"
ACTION_ROTATION_FINISHED: Final = "admin.encryption_rotation_finished"


def _active_prefix(keyring: Keyring) -> str:
    return f"{CIPHERTEXT_VERSION}.{keyring.active_key_id}."


def _not_under_active_key(column: EncryptedColumn, keyring: Keyring) -> ColumnElement[bool]:
    # substr equality rather than LIKE: LIKE is case-blind on SQLite and treats "_" (legal
    # in a key id) as a wildcard.
    prefix = _active_prefix(keyring)
    return column.value.is_not(None) & (func.substr(column.value, 1, len(prefix)) != prefix)


def _key_id_of(session: AsyncSession, value: InstrumentedAttribute[Any]) -> ColumnElement[str]:
    """The key id in a ciphertext's header (``v1.<key id>.<nonce>.<sealed>``), in SQL."""
    if session.get_bind().dialect.name == "postgresql":
        return func.split_part(value, ".", 2)
    after_version = func.substr(value, len(CIPHERTEXT_VERSION) + 2)
    return func.substr(after_version, 1, func.instr(after_version, ".") - 1)


# -- where things stand ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeyUsage:
    """How many values of one column are under one key id."""

    column: str
    key_id: str
    values: int


async def key_usage(session: AsyncSession) -> list[KeyUsage]:
    """Values per column and key id, read from the ciphertext headers (nothing decrypted)."""
    usage: list[KeyUsage] = []
    for column in encrypted_columns():
        key_id = _key_id_of(session, column.value).label("key_id")
        rows = await session.execute(
            select(key_id, func.count())
            .where(column.value.is_not(None))
            .group_by(key_id)
            .order_by(key_id)
        )
        usage.extend(KeyUsage(column.name, str(kid), int(count)) for kid, count in rows.all())
    return usage


async def values_to_rotate(session: AsyncSession, keyring: Keyring) -> int:
    """How many stored values are not under the keyring's active key."""
    total = 0
    for column in encrypted_columns():
        count = await session.scalar(
            select(func.count())
            .select_from(column.entity)
            .where(_not_under_active_key(column, keyring))
        )
        total += int(count or 0)
    return total


# -- one batch --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationCursor:
    """Where a rotation pass stands: the column it is in, after which row key."""

    column: str
    after: uuid.UUID | None = None

    def to_payload(self) -> dict[str, str | None]:
        return {"column": self.column, "after": str(self.after) if self.after else None}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RotationCursor | None:
        column = payload.get("column")
        if column is None:
            return None
        if column not in {known.name for known in encrypted_columns()}:
            raise ValueError("the rotation payload names an unknown column")
        after = payload.get("after")
        return cls(str(column), uuid.UUID(str(after)) if after else None)


@dataclass(frozen=True)
class BatchOutcome:
    rotated: int
    """Values re-encrypted under the active key by this batch."""
    changed_meanwhile: int
    """Values left alone because they changed between the read and the update."""
    unreadable: int
    """Values that could not be decrypted with any configured key."""
    next: RotationCursor | None
    """Where the next batch starts; ``None`` when the pass has walked every column."""


async def rotate_batch(
    session: AsyncSession,
    keyring: Keyring,
    cursor: RotationCursor | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> BatchOutcome:
    """Re-encrypt up to ``batch_size`` values under the active key, in ``session``'s
    transaction, starting at ``cursor`` (the beginning when ``None``)."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}")
    columns = encrypted_columns()
    names = [column.name for column in columns]
    position = names.index(cursor.column) if cursor is not None else 0
    after = cursor.after if cursor is not None else None
    budget = batch_size
    rotated = changed = unreadable = 0
    while True:
        column = columns[position]
        query = select(column.row_key, column.value).where(_not_under_active_key(column, keyring))
        if after is not None:
            query = query.where(column.row_key > after)
        rows = (await session.execute(query.order_by(column.row_key).limit(budget))).all()
        for row_key, old in rows:
            try:
                new = keyring.rotate(old, context=column.context(row_key))
            except DecryptionError as exc:
                unreadable += 1
                log.warning(
                    "an encrypted value could not be re-encrypted",
                    column=column.name,
                    row=str(row_key),
                    reason=str(exc),
                )
                continue
            result = await session.execute(
                update(column.entity)
                .where(column.row_key == row_key, column.value == old)
                .values({column.value: new})
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 0):
                rotated += 1
            else:
                changed += 1
        budget -= len(rows)
        if budget == 0:
            next_cursor: RotationCursor | None = RotationCursor(column.name, rows[-1][0])
            break
        # This column is done; carry what is left of the budget into the next one.
        position += 1
        after = None
        if position == len(columns):
            next_cursor = None
            break
    return BatchOutcome(rotated, changed, unreadable, next_cursor)


# -- asking for it, and the job that does it ----------------------------------------------------


async def record_rotation_request(
    session: AsyncSession,
    keyring: Keyring,
    *,
    clock: Clock,
    via: str,
    actor_id: uuid.UUID | None = None,
) -> None:
    await record_audit_event(
        session,
        action=ACTION_ROTATION_REQUESTED,
        actor_id=actor_id,
        data={"key_id": keyring.active_key_id, "via": via},
        clock=clock,
    )


async def request_rotation(
    session: AsyncSession,
    keyring: Keyring,
    *,
    clock: Clock,
    batch_size: int = DEFAULT_BATCH_SIZE,
    actor_id: uuid.UUID | None = None,
) -> uuid.UUID | None:
    """Enqueue the re-encryption of every value under the active key, in the caller's
    transaction, and record the request in the audit log. Returns the job's id."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}")
    await record_rotation_request(session, keyring, clock=clock, via="job", actor_id=actor_id)
    return await enqueue(
        session,
        REENCRYPT_JOB,
        {"key_id": keyring.active_key_id, "batch_size": batch_size, **_totals()},
        now=clock.now(),
    )


def _totals(rotated: int = 0, changed_meanwhile: int = 0, unreadable: int = 0) -> dict[str, int]:
    return {"rotated": rotated, "changed_meanwhile": changed_meanwhile, "unreadable": unreadable}


async def record_finished_pass(
    session: AsyncSession, keyring: Keyring, totals: dict[str, int], *, clock: Clock
) -> None:
    log.info("re-encryption pass finished", key_id=keyring.active_key_id, **totals)
    await record_audit_event(
        session,
        action=ACTION_ROTATION_FINISHED,
        data={"key_id": keyring.active_key_id, **totals},
        clock=clock,
    )


@registry.job(REENCRYPT_JOB)
async def reencrypt(ctx: JobContext, payload: dict[str, Any]) -> None:
    """One batch of a rotation pass; enqueues the next batch in the same transaction, so
    the pass advances exactly when this batch commits."""
    keyring: Keyring = ctx.services.data_keys.keyring
    if payload.get("key_id") != keyring.active_key_id:
        # A newer key was put first since the pass began: it re-encrypts to that one.
        log.info("re-encrypting under a newer active key", key_id=keyring.active_key_id)
    batch_size = int(payload.get("batch_size", DEFAULT_BATCH_SIZE))
    outcome = await rotate_batch(
        ctx.session, keyring, RotationCursor.from_payload(payload), batch_size=batch_size
    )
    totals = _totals(
        int(payload.get("rotated", 0)) + outcome.rotated,
        int(payload.get("changed_meanwhile", 0)) + outcome.changed_meanwhile,
        int(payload.get("unreadable", 0)) + outcome.unreadable,
    )
    if outcome.next is None:
        await record_finished_pass(ctx.session, keyring, totals, clock=ctx.clock)
        return
    await enqueue(
        ctx.session,
        REENCRYPT_JOB,
        {
            "key_id": keyring.active_key_id,
            "batch_size": batch_size,
            **outcome.next.to_payload(),
            **totals,
        },
        now=ctx.now(),
    )


async def rotate_all(
    transaction: Callable[[], AbstractAsyncContextManager[AsyncSession]],
    keyring: Keyring,
    *,
    clock: Clock,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[BatchOutcome], None] | None = None,
) -> dict[str, int]:
    """A whole pass inline, one ``transaction()`` per batch (``soko keys rotate --wait``).
    Returns the totals, which are also recorded in the audit log."""
    cursor: RotationCursor | None = None
    totals = _totals()
    while True:
        async with transaction() as session:
            outcome = await rotate_batch(session, keyring, cursor, batch_size=batch_size)
            totals = _totals(
                totals["rotated"] + outcome.rotated,
                totals["changed_meanwhile"] + outcome.changed_meanwhile,
                totals["unreadable"] + outcome.unreadable,
            )
            if outcome.next is None:
                await record_finished_pass(session, keyring, totals, clock=clock)
        if on_batch is not None:
            on_batch(outcome)
        if outcome.next is None:
            return totals
        cursor = outcome.next
