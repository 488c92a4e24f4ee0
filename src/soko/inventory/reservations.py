"""Reservations: checkout holds stock for a while, payment commits it, shipping takes it.

The counters of a stock level move only through conditional UPDATEs, so concurrent
checkouts can never take more than is there (``reserved + allocated <= on_hand`` is also
a CHECK constraint). Two strategies choose how the rows are claimed:

- **optimistic**: read the stock rows without locks, plan, then one conditional UPDATE
  for every row of the plan. PostgreSQL re-checks the condition on the newest row
  version after waiting for a concurrent writer, so the UPDATE is the arbiter. When a
  row falls short the partial claim is undone and the plan is made again from a fresh
  read; the last attempt reads under row locks, so the answer is always definitive.
- **pessimistic**: read the rows ``FOR UPDATE`` in (variant_id, location_id) order, plan
  on exact numbers, then update. On SQLite every writing transaction is already
  ``BEGIN IMMEDIATE``, so both strategies run serialized there.

Deadlocks (PostgreSQL) are avoided by order. Reservation rows are always locked before
stock rows, and expired holds are taken with ``SKIP LOCKED``, never waited for. A
reservation takes all its stock row locks in one statement, in (variant_id,
location_id) order: the pessimistic read, or the optimistic claim, which locks every
row of the variants it plans for (a variant with a single row just updates it). A row
that fell short stays locked, so the retry works within locks it already holds. Every
other UPDATE over several stock rows (commit, release, shipping, the release job) locks
them in the same order first.

Statement budget of :func:`reserve`: one read, one stock UPDATE and one INSERT of the
reservation rows; one more UPDATE when expired holds of these variants are released on
the way. It does not grow with the number of lines or sellers.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from soko.inventory.errors import OutOfStock
from soko.inventory.models import (
    AdjustmentKind,
    Location,
    Reservation,
    ReservationStatus,
    StockAdjustment,
    StockLevel,
)
from soko.inventory.planning import (
    ReservationRequest,
    StockKey,
    StockRow,
    merge_lines,
    plan_reservation,
)
from soko.inventory.presence import presence_changed
from soko.inventory.tags import INVENTORY_TAG, stock_tag
from soko.platform.config import ReservationStrategy
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime, invalidate_after_commit

# Optimistic attempts before the last one, which reads under row locks.
OPTIMISTIC_ATTEMPTS = 3
# Stock keys per UPDATE when releasing many holds at once (the job): keeps the bound
# parameters well under both drivers' limits.
KEYS_PER_STATEMENT = 200

S = StockLevel
R = Reservation
# The Core tables, for the statements of the hot path: a checkout binds values to
# statements built once and skips the ORM's bookkeeping (and its bulk-insert path).
STOCK_LEVELS = cast(Table, StockLevel.__table__)
RESERVATIONS = cast(Table, Reservation.__table__)
LOCATIONS = cast(Table, Location.__table__)

HOLD_EXPIRED = "hold expired"


def _is_postgres(session: AsyncSession) -> bool:
    bind = session.get_bind()
    return bind.dialect.name == "postgresql"


def _key_in(keys: Sequence[StockKey]) -> ColumnElement[bool]:
    if len(keys) == 1:
        (variant_id, location_id), *_ = keys
        return and_(S.variant_id == variant_id, S.location_id == location_id)
    return tuple_(S.variant_id, S.location_id).in_(keys)


def _per_key(values: Mapping[StockKey, int], keys: Sequence[StockKey]) -> ColumnElement[int]:
    """The value of each stock row as a CASE over its key (a plain parameter for one)."""
    if len(keys) == 1:
        return literal(values.get(keys[0], 0))
    whens = [
        (and_(S.variant_id == key[0], S.location_id == key[1]), values.get(key, 0))
        for key in keys
        if values.get(key, 0)
    ]
    if not whens:
        return literal(0)
    return case(*whens, else_=0)


def _rows_locked_first(rows: ColumnElement[bool]) -> ColumnElement[bool]:
    """A condition for an UPDATE that first locks every stock row matching ``rows``, in
    (variant_id, location_id) order, in the same statement (PostgreSQL).

    PostgreSQL locks the rows an UPDATE touches in the order it happens to scan them,
    which differs between transactions; and a locking ``IN (subquery)`` runs as a semi
    join that locks only up to each match. An uncorrelated scalar subquery is planned as
    an InitPlan behind a one-time filter: it runs whole, before the first row is
    touched, so every row is locked, in order, before any is updated."""
    locking = (
        select(S.variant_id, S.location_id)
        .where(rows)
        .order_by(S.variant_id, S.location_id)
        .with_for_update()
        .subquery("locked_in_order")
    )
    return select(func.count()).select_from(locking).scalar_subquery() >= 0


def _locked_keys(session: AsyncSession, keys: Sequence[StockKey]) -> ColumnElement[bool]:
    """The WHERE of an UPDATE over ``keys`` that locks them all in key order first. One
    row needs no ordering, and SQLite serializes writers anyway."""
    if len(keys) == 1 or not _is_postgres(session):
        return _key_in(keys)
    return and_(_key_in(keys), _rows_locked_first(_key_in(keys)))


def _stock_rows_statement() -> Select[*tuple[Any, ...]]:
    """The read of :func:`read_stock_rows`, built once: on the hot path a checkout only
    binds its values (Core tables, no ORM bookkeeping)."""
    stock, holds, places = STOCK_LEVELS.c, RESERVATIONS.c, LOCATIONS.c
    ids: Any = bindparam("variant_ids", expanding=True)
    expired = (
        select(holds.variant_id, holds.location_id, func.sum(holds.quantity).label("quantity"))
        .where(
            holds.status == ReservationStatus.held.value,
            holds.expires_at <= bindparam("now", type_=holds.expires_at.type),
            holds.variant_id.in_(ids),
        )
        .group_by(holds.variant_id, holds.location_id)
        .subquery("expired_holds")
    )
    return (
        select(
            stock.variant_id,
            stock.location_id,
            stock.on_hand,
            stock.reserved,
            stock.allocated,
            func.coalesce(expired.c.quantity, 0),
            places.active,
        )
        .select_from(STOCK_LEVELS)
        .join(LOCATIONS, places.id == stock.location_id)
        .outerjoin(
            expired,
            and_(
                expired.c.variant_id == stock.variant_id,
                expired.c.location_id == stock.location_id,
            ),
        )
        .where(stock.variant_id.in_(ids))
        .order_by(stock.variant_id, stock.location_id)
    )


_READ_STOCK_ROWS = _stock_rows_statement()
_READ_STOCK_ROWS_LOCKED = _READ_STOCK_ROWS.with_for_update(of=STOCK_LEVELS)

# The claim of a single stock row without expired holds to give back: the hot path of a
# popular item at one location.
_CLAIM_ONE_ROW = (
    update(STOCK_LEVELS)
    .where(
        STOCK_LEVELS.c.variant_id
        == bindparam("claim_variant_id", type_=STOCK_LEVELS.c.variant_id.type),
        STOCK_LEVELS.c.location_id
        == bindparam("claim_location_id", type_=STOCK_LEVELS.c.location_id.type),
        STOCK_LEVELS.c.on_hand - STOCK_LEVELS.c.reserved - STOCK_LEVELS.c.allocated
        >= bindparam("claim_quantity", type_=Integer()),
    )
    .values(
        reserved=STOCK_LEVELS.c.reserved + bindparam("claim_quantity", type_=Integer()),
        version=STOCK_LEVELS.c.version + 1,
        updated_at=bindparam("claim_now", type_=STOCK_LEVELS.c.updated_at.type),
    )
    .returning(STOCK_LEVELS.c.variant_id, STOCK_LEVELS.c.location_id)
)


def _hold_what_was_claimed(claim: Any) -> Any:
    """The stock row claim ``claim`` (an UPDATE ... RETURNING the row's key) and its
    reservation row in one statement (PostgreSQL): ``WITH claimed AS (<claim>) INSERT
    INTO inventory_reservations SELECT ... FROM claimed``. The stock row of a popular
    item stays locked from its UPDATE until the commit, and every round trip in between
    (each also waiting its turn in a busy event loop) is time the next buyer waits. The
    INSERT writes nothing when the UPDATE took nothing."""
    claimed = claim.cte("claimed")
    return (
        RESERVATIONS.insert()
        .from_select(
            ["id", "holder_ref", "variant_id", "location_id", "quantity", "status",
             "expires_at", "created_at"],
            select(
                bindparam("hold_id", type_=RESERVATIONS.c.id.type),
                bindparam("holder_ref", type_=RESERVATIONS.c.holder_ref.type),
                claimed.c.variant_id,
                claimed.c.location_id,
                bindparam("claim_quantity", type_=Integer()),
                literal(ReservationStatus.held.value, RESERVATIONS.c.status.type),
                bindparam("hold_expires_at", type_=RESERVATIONS.c.expires_at.type),
                bindparam("claim_now", type_=STOCK_LEVELS.c.updated_at.type),
            ).select_from(claimed),
        )
        .returning(RESERVATIONS.c.variant_id, RESERVATIONS.c.location_id)
    )  # fmt: skip


_CLAIM_AND_HOLD_ONE_ROW = _hold_what_was_claimed(_CLAIM_ONE_ROW)
# For the pessimistic strategy: the stock row is taken FOR UPDATE before the UPDATE
# decides on it, in the same statement.
_CLAIM_AND_HOLD_ONE_ROW_LOCKED = _hold_what_was_claimed(
    _CLAIM_ONE_ROW.where(
        _rows_locked_first(
            and_(
                S.variant_id == bindparam("claim_variant_id", type_=STOCK_LEVELS.c.variant_id.type),
                S.location_id
                == bindparam("claim_location_id", type_=STOCK_LEVELS.c.location_id.type),
            )
        )
    )
)


async def read_stock_rows(
    session: AsyncSession | AsyncConnection,
    variant_ids: Iterable[uuid.UUID],
    now: dt.datetime,
    *,
    lock: bool = False,
) -> list[StockRow]:
    """The stock rows of ``variant_ids`` (active or not), each with the units of its
    holds that expired but are not released yet; in one statement.

    ``lock`` takes the rows ``FOR UPDATE`` in (variant_id, location_id) order."""
    statement = _READ_STOCK_ROWS_LOCKED if lock else _READ_STOCK_ROWS
    result = await session.execute(statement, {"variant_ids": list(variant_ids), "now": now})
    return [
        StockRow(
            variant_id=variant_id,
            location_id=location_id,
            on_hand=on_hand,
            reserved=reserved,
            allocated=allocated,
            expired_held=int(expired_held),
            active=bool(active),
        )
        for variant_id, location_id, on_hand, reserved, allocated, expired_held, active in result
    ]


async def _expire_held(
    session: AsyncSession,
    now: dt.datetime,
    *,
    variant_ids: Sequence[uuid.UUID] | None,
    limit: int,
    location_id: uuid.UUID | None = None,
) -> dict[StockKey, int]:
    """Mark held reservations past their time as expired; the units to release per key.

    Rows another transaction is handling right now are skipped (PostgreSQL), never
    waited for: that transaction releases them."""
    candidates = (
        select(R.id)
        .where(R.status == ReservationStatus.held.value, R.expires_at <= now)
        .order_by(R.id)
        .limit(limit)
    )
    if variant_ids is not None:
        candidates = candidates.where(R.variant_id.in_(variant_ids))
    if location_id is not None:
        candidates = candidates.where(R.location_id == location_id)
    if _is_postgres(session):
        candidates = candidates.with_for_update(skip_locked=True)
    result = await session.execute(
        update(R)
        .where(R.id.in_(candidates.scalar_subquery()), R.status == ReservationStatus.held.value)
        .values(status=ReservationStatus.expired.value, ended_at=now, end_reason=HOLD_EXPIRED)
        .returning(R.variant_id, R.location_id, R.quantity)
        .execution_options(synchronize_session=False)
    )
    return _sum_by_key(result)


def _sum_by_key(rows: Iterable[tuple[uuid.UUID, uuid.UUID, int]]) -> dict[StockKey, int]:
    totals: dict[StockKey, int] = {}
    for variant_id, location_id, quantity in rows:
        key = (variant_id, location_id)
        totals[key] = totals.get(key, 0) + quantity
    return totals


async def _move_counters(
    session: AsyncSession,
    now: dt.datetime,
    *,
    reserved: Mapping[StockKey, int] | None = None,
    allocated: Mapping[StockKey, int] | None = None,
    on_hand: Mapping[StockKey, int] | None = None,
) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID, int]]:
    """Add the given deltas to the counters of their stock rows, unconditionally.

    For moves the reservation rows already justify (a hold released, committed or
    shipped): the CHECK constraints still stand behind them. Returns (variant_id,
    location_id, seller_id, on_hand) of each row."""
    keys = sorted(set(reserved or {}) | set(allocated or {}) | set(on_hand or {}))
    changed: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID, int]] = []
    for start in range(0, len(keys), KEYS_PER_STATEMENT):
        chunk = keys[start : start + KEYS_PER_STATEMENT]
        values: dict[str, object] = {"version": S.version + 1, "updated_at": now}
        if reserved:
            values["reserved"] = S.reserved + _per_key(reserved, chunk)
        if allocated:
            values["allocated"] = S.allocated + _per_key(allocated, chunk)
        if on_hand:
            values["on_hand"] = S.on_hand + _per_key(on_hand, chunk)
        result = await session.execute(
            update(S)
            .where(_locked_keys(session, chunk))
            .values(values)
            .returning(S.variant_id, S.location_id, S.seller_id, S.on_hand)
            .execution_options(synchronize_session=False)
        )
        changed.extend(
            (variant_id, location_id, seller_id, level)
            for variant_id, location_id, seller_id, level in result
        )
    stock_changed(session, {variant_id for variant_id, _ in keys})
    return changed


def stock_changed(session: AsyncSession, variant_ids: Iterable[uuid.UUID]) -> None:
    """Drop cached reads of these variants' stock once the transaction commits."""
    invalidate_after_commit(session, INVENTORY_TAG, *(stock_tag(v) for v in variant_ids))


def _negate(values: Mapping[StockKey, int]) -> dict[StockKey, int]:
    return {key: -quantity for key, quantity in values.items()}


@dataclass(frozen=True, slots=True)
class _Claim:
    """What one attempt asked of each stock row: units to take and expired units to
    give back in the same statement."""

    takes: Mapping[StockKey, int]
    releases: Mapping[StockKey, int]


@dataclass(frozen=True, slots=True)
class _Hold:
    """The reservation rows a claim writes in its own statement, when it can."""

    holder_ref: uuid.UUID
    expires_at: dt.datetime


async def _claim(
    session: AsyncSession,
    now: dt.datetime,
    claim: _Claim,
    *,
    lock_variants: Sequence[uuid.UUID] | None,
    hold: _Hold | None = None,
) -> tuple[set[StockKey], bool]:
    """One conditional UPDATE: take ``claim.takes`` where each row still has them free,
    and give back ``claim.releases``. Returns the keys that were updated, and whether
    the reservation rows of ``hold`` were written too (one stock row on PostgreSQL: in
    the same statement, only when its row was taken).

    ``lock_variants`` (PostgreSQL) first locks every stock row of those variants in key
    order, within the same statement: whatever the plan, a retry then never needs a lock
    it does not hold, so two buyers retrying on each other's rows cannot deadlock."""
    if len(claim.takes) == 1 and not claim.releases and lock_variants is None:
        ((variant_id, location_id), quantity), *_ = claim.takes.items()
        parameters: dict[str, Any] = {
            "claim_variant_id": variant_id,
            "claim_location_id": location_id,
            "claim_quantity": quantity,
            "claim_now": now,
        }
        holding = False
        if hold is not None and _is_postgres(session):
            holding = True
            parameters.update(
                hold_id=uuid7(), holder_ref=hold.holder_ref, hold_expires_at=hold.expires_at
            )
        one = await session.execute(
            _CLAIM_AND_HOLD_ONE_ROW if holding else _CLAIM_ONE_ROW, parameters
        )
        taken = {(row_variant, row_location) for row_variant, row_location in one}
        return taken, holding and bool(taken)
    keys = sorted(set(claim.takes) | set(claim.releases))
    take = _per_key(claim.takes, keys)
    where = [_key_in(keys)]
    if lock_variants is not None:
        where.append(_rows_locked_first(S.variant_id.in_(lock_variants)))
    if claim.releases:
        release = _per_key(claim.releases, keys)
        reserved_after = S.reserved - release + take
        free = S.on_hand - (S.reserved - release) - S.allocated
    else:  # the usual case, and the hot path: keep the statement plain
        reserved_after = S.reserved + take
        free = S.on_hand - S.reserved - S.allocated
    result = await session.execute(
        update(S)
        .where(*where, free >= take)
        .values(reserved=reserved_after, version=S.version + 1, updated_at=now)
        .returning(S.variant_id, S.location_id)
        .execution_options(synchronize_session=False)
    )
    return {(variant_id, location_id) for variant_id, location_id in result}, False


async def reserve(
    session: AsyncSession,
    runtime: Runtime,
    *,
    holder_ref: uuid.UUID,
    lines: Sequence[ReservationRequest],
    expires_at: dt.datetime,
    strategy: ReservationStrategy | None = None,
) -> None:
    wanted = merge_lines(lines)
    if not wanted:
        return
    strategy = strategy or runtime.settings.reservation_strategy
    now = runtime.clock.now()
    locking = strategy is ReservationStrategy.pessimistic
    variant_ids = list(wanted)

    rows = await read_stock_rows(session, variant_ids, now, lock=locking)
    rows, releases = await _release_expired_in_the_way(session, now, variant_ids, rows)

    # Row locks: the pessimistic read holds them all already; one row needs no order;
    # SQLite serializes writers. Otherwise the claim takes them all, in key order.
    lock_variants = None if locking or len(rows) <= 1 or not _is_postgres(session) else variant_ids
    attempts = 1 if locking else OPTIMISTIC_ATTEMPTS + 1
    hold = _Hold(holder_ref=holder_ref, expires_at=expires_at)
    held = False
    for attempt in range(attempts):
        plan = plan_reservation(wanted, rows)
        if not plan.feasible:
            if releases:
                await _move_counters(session, now, reserved=_negate(releases))
            raise OutOfStock(plan.shortages)
        claimed, held = await _claim(
            session,
            now,
            _Claim(takes=plan.takes, releases=releases),
            lock_variants=lock_variants,
            hold=hold,
        )
        if claimed.issuperset(plan.takes):
            break
        # Some row fell short since the read: undo what this attempt took, keep the
        # releases (all applied now), and plan again from the rows as they are.
        undo = {key: -q for key, q in plan.takes.items() if key in claimed}
        for key, quantity in releases.items():
            if key not in claimed:
                undo[key] = undo.get(key, 0) - quantity
        if undo:
            await _move_counters(session, now, reserved=undo)
        releases = {}
        lock_variants = None
        locking = attempt + 1 >= OPTIMISTIC_ATTEMPTS
        rows = await read_stock_rows(session, variant_ids, now, lock=locking)
        rows, releases = await _release_expired_in_the_way(session, now, variant_ids, rows)
    else:  # pragma: no cover - the locked read above makes the last plan exact
        raise RuntimeError("stock changed under row locks")

    if held:  # written by the claim itself
        stock_changed(session, variant_ids)
        return
    await session.execute(
        RESERVATIONS.insert(),
        [
            {
                "id": uuid7(),
                "holder_ref": holder_ref,
                "variant_id": variant_id,
                "location_id": location_id,
                "quantity": quantity,
                "status": ReservationStatus.held.value,
                "expires_at": expires_at,
                "created_at": now,
            }
            for (variant_id, location_id), quantity in plan.takes.items()
        ],
    )
    stock_changed(session, variant_ids)


async def reserve_committed(
    runtime: Runtime,
    *,
    holder_ref: uuid.UUID,
    lines: Sequence[ReservationRequest],
    expires_at: dt.datetime,
    strategy: ReservationStrategy | None = None,
) -> None:
    """:func:`reserve` in a transaction of its own, committed before it returns.

    On PostgreSQL a hold of one stock row (the usual case: a variant stocked at one
    location) is one statement in autocommit: the row is locked, updated, its hold
    written and the whole committed inside the database, with no round trip to the
    application while the lock is held. The pessimistic strategy takes the row ``FOR
    UPDATE`` first in that statement. Any other hold (several rows, expired holds to give
    back on the way, a claim that fell short) runs :func:`reserve` in a transaction."""
    wanted = merge_lines(lines)
    if not wanted:
        return
    strategy = strategy or runtime.settings.reservation_strategy
    if runtime.db.dialect == "postgresql" and len(wanted) == 1:
        async with runtime.db.writing_once() as connection:
            held = await _hold_one_row(
                connection, runtime, holder_ref, wanted, expires_at, strategy
            )
        if held:
            await runtime.invalidate(INVENTORY_TAG, *(stock_tag(v) for v in wanted))
            return
    async with runtime.transaction() as session:
        await reserve(
            session,
            runtime,
            holder_ref=holder_ref,
            lines=lines,
            expires_at=expires_at,
            strategy=strategy,
        )


async def _hold_one_row(
    connection: AsyncConnection,
    runtime: Runtime,
    holder_ref: uuid.UUID,
    wanted: Mapping[uuid.UUID, int],
    expires_at: dt.datetime,
    strategy: ReservationStrategy,
) -> bool:
    """Hold a variant stocked in one row, in one autocommitted statement; False when
    this takes more (several rows, expired holds in the way, the row fell short since
    the read), for :func:`reserve` to decide with its retries and exact shortages."""
    now = runtime.clock.now()
    rows = await read_stock_rows(connection, list(wanted), now)
    if len(rows) != 1 or rows[0].expired_held:
        return False
    plan = plan_reservation(wanted, rows)
    if not plan.feasible:
        raise OutOfStock(plan.shortages)
    ((variant_id, location_id), quantity), *_ = plan.takes.items()
    statement = (
        _CLAIM_AND_HOLD_ONE_ROW_LOCKED
        if strategy is ReservationStrategy.pessimistic
        else _CLAIM_AND_HOLD_ONE_ROW
    )
    result = await connection.execute(
        statement,
        {
            "claim_variant_id": variant_id,
            "claim_location_id": location_id,
            "claim_quantity": quantity,
            "claim_now": now,
            "hold_id": uuid7(),
            "holder_ref": holder_ref,
            "hold_expires_at": expires_at,
        },
    )
    return result.first() is not None


async def _release_expired_in_the_way(
    session: AsyncSession, now: dt.datetime, variant_ids: Sequence[uuid.UUID], rows: list[StockRow]
) -> tuple[list[StockRow], dict[StockKey, int]]:
    """Expire the holds past their time that the read found, and plan with only the
    units this transaction releases: holds another transaction is expiring right now
    are skipped, and their units are not ours to count until it commits."""
    if not any(row.expired_held for row in rows):
        return rows, {}
    releases = await _expire_held(session, now, variant_ids=variant_ids, limit=10_000)
    return [_after_release(row, releases) for row in rows], releases


def _after_release(row: StockRow, releases: Mapping[StockKey, int]) -> StockRow:
    released = releases.get((row.variant_id, row.location_id), 0)
    return StockRow(
        variant_id=row.variant_id,
        location_id=row.location_id,
        on_hand=row.on_hand,
        reserved=row.reserved - released,
        allocated=row.allocated,
        expired_held=0,
        active=row.active,
    )


def _holder_filter(
    holder_ref: uuid.UUID, variant_ids: Iterable[uuid.UUID] | None
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [R.holder_ref == holder_ref]
    if variant_ids is not None:
        conditions.append(R.variant_id.in_(list(variant_ids)))
    return conditions


async def _end(
    session: AsyncSession,
    now: dt.datetime,
    conditions: Sequence[ColumnElement[bool]],
    *,
    from_status: ReservationStatus,
    to_status: ReservationStatus,
    reason: str | None = None,
) -> dict[StockKey, int]:
    result = await session.execute(
        update(R)
        .where(*conditions, R.status == from_status.value)
        .values(
            status=to_status.value,
            ended_at=now if to_status is not ReservationStatus.committed else None,
            end_reason=reason,
        )
        .returning(R.variant_id, R.location_id, R.quantity)
        .execution_options(synchronize_session=False)
    )
    return _sum_by_key(result)


async def commit_hold(session: AsyncSession, runtime: Runtime, holder_ref: uuid.UUID) -> None:
    now = runtime.clock.now()
    committed = await _end(
        session,
        now,
        _holder_filter(holder_ref, None),
        from_status=ReservationStatus.held,
        to_status=ReservationStatus.committed,
    )
    if committed:
        await _move_counters(session, now, reserved=_negate(committed), allocated=committed)


async def release_hold(
    session: AsyncSession,
    runtime: Runtime,
    holder_ref: uuid.UUID,
    *,
    reason: str,
    variant_ids: Iterable[uuid.UUID] | None = None,
) -> int:
    ids = None if variant_ids is None else list(variant_ids)
    return await _release(session, runtime, _holder_filter(holder_ref, ids), reason)


async def release_holds(
    session: AsyncSession, runtime: Runtime, holder_refs: Iterable[uuid.UUID], *, reason: str
) -> int:
    """:func:`release_hold` for many holders at once: one pass over their reservations
    and one over the stock rows, in key order (several passes, one a holder, would lock
    rows of one item before another's and could deadlock with a checkout)."""
    refs = sorted(set(holder_refs))
    if not refs:
        return 0
    return await _release(session, runtime, [R.holder_ref.in_(refs)], reason)


async def _release(
    session: AsyncSession,
    runtime: Runtime,
    conditions: Sequence[ColumnElement[bool]],
    reason: str,
) -> int:
    now = runtime.clock.now()
    held = await _end(
        session,
        now,
        conditions,
        from_status=ReservationStatus.held,
        to_status=ReservationStatus.released,
        reason=reason,
    )
    committed = await _end(
        session,
        now,
        conditions,
        from_status=ReservationStatus.committed,
        to_status=ReservationStatus.released,
        reason=reason,
    )
    if held or committed:
        await _move_counters(
            session, now, reserved=_negate(held) or None, allocated=_negate(committed) or None
        )
    return sum(held.values()) + sum(committed.values())


async def fulfil(
    session: AsyncSession,
    runtime: Runtime,
    holder_ref: uuid.UUID,
    variant_ids: Iterable[uuid.UUID] | None = None,
) -> None:
    now = runtime.clock.now()
    ids = None if variant_ids is None else list(variant_ids)
    shipped = await _end(
        session,
        now,
        _holder_filter(holder_ref, ids),
        from_status=ReservationStatus.committed,
        to_status=ReservationStatus.fulfilled,
        reason="shipped",
    )
    if not shipped:
        return
    gone = _negate(shipped)
    changed = await _move_counters(session, now, allocated=gone, on_hand=gone)
    await session.execute(
        insert(StockAdjustment),
        [
            {
                "id": uuid7(),
                "variant_id": variant_id,
                "location_id": location_id,
                "seller_id": seller_id,
                "delta": gone[(variant_id, location_id)],
                "reason": f"shipped to a buyer (checkout {holder_ref})",
                "kind": AdjustmentKind.sale.value,
                "actor_id": None,
                "on_hand_after": on_hand_after,
                "at": now,
            }
            for variant_id, location_id, seller_id, on_hand_after in changed
        ],
    )
    await presence_changed(
        session, {variant_id for variant_id, _, _, on_hand_after in changed if on_hand_after == 0}
    )


async def rehold_if_available(
    session: AsyncSession,
    runtime: Runtime,
    holder_ref: uuid.UUID,
    expires_at: dt.datetime,
    *,
    variant_ids: Iterable[uuid.UUID] | None = None,
) -> bool:
    ids = None if variant_ids is None else list(variant_ids)
    conditions = _holder_filter(holder_ref, ids)
    ended_statuses = (ReservationStatus.expired.value, ReservationStatus.released.value)
    async with session.begin_nested() as savepoint:
        # Holds still in place (even past their time, not released yet) just get longer.
        await session.execute(
            update(R)
            .where(*conditions, R.status == ReservationStatus.held.value)
            .values(expires_at=expires_at)
            .execution_options(synchronize_session=False)
        )
        result = await session.execute(
            update(R)
            .where(*conditions, R.status.in_(ended_statuses))
            .values(status=ReservationStatus.renewed.value)
            .returning(R.variant_id, R.quantity)
            .execution_options(synchronize_session=False)
        )
        again = [
            ReservationRequest(variant_id=variant_id, quantity=quantity)
            for variant_id, quantity in result
        ]
        if again:
            try:
                await reserve(
                    session,
                    runtime,
                    holder_ref=holder_ref,
                    lines=again,
                    expires_at=expires_at,
                )
            except OutOfStock:
                await savepoint.rollback()
                return False
    held = await session.scalar(
        select(func.count())
        .select_from(R)
        .where(
            *conditions,
            R.status.in_((ReservationStatus.held.value, ReservationStatus.committed.value)),
        )
    )
    return bool(held)


async def release_expired_at(
    session: AsyncSession, now: dt.datetime, variant_id: uuid.UUID, location_id: uuid.UUID
) -> int:
    """Release the holds of one stock level whose time ran out; the units freed. Only
    that row is locked, so a seller's change takes no lock out of order."""
    releases = await _expire_held(
        session, now, variant_ids=[variant_id], limit=10_000, location_id=location_id
    )
    if releases:
        await _move_counters(session, now, reserved=_negate(releases))
    return sum(releases.values())


async def release_expired_holds(
    session: AsyncSession, now: dt.datetime, *, batch_size: int = 1000
) -> int:
    """Release every held reservation whose time ran out; the number of units freed.

    Works in batches so one run never holds a huge statement or lock set."""
    freed = 0
    while True:
        releases = await _expire_held(session, now, variant_ids=None, limit=batch_size)
        if not releases:
            return freed
        await _move_counters(session, now, reserved=_negate(releases))
        freed += sum(releases.values())
