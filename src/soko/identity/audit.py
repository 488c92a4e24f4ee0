"""The audit log: an append-only, hash-chained record of security and admin events.

Each event carries a ``seq`` (1, 2, 3...) and a SHA-256 ``hash`` over its canonical form
and the previous event's hash (64 zeros before the first). Editing any field, deleting
or reordering an event breaks the chain at that event, which :func:`verify_audit_chain`
reports. Deleting the newest events (truncating the tail) leaves a valid shorter chain:
on PostgreSQL the head row (below) still names the newest event, and verification
reports a chain that ends before it, or whose event at its seq has another hash, unless
the head row was edited too. The report names the head (last seq and hash) so an
operator can also compare it with one recorded elsewhere earlier.

Appends are serialized so the chain never forks, and the lock is held until the caller's
transaction ends, so record events late in a transaction, after the slow work:

- On PostgreSQL an append is one statement: it updates the chain's head row
  (``audit_chain_head``: the last seq, prev_hash and hash, the new hash computed by
  PostgreSQL's ``sha256`` over the event's canonical form, which Python cuts around the
  two fields only the head knows) and inserts the event from what the update returns.
  The update locks the row until commit; a second append waiting on it is re-run by
  PostgreSQL on the row as that commit left it (READ COMMITTED re-checks an updated
  row), so it chains on the newest event without a read of its own. The statement also
  takes a transaction-scoped advisory lock first, the lock appends took before the head
  row existed. Should the head row be missing (the first append) or behind the events
  (rows appended without it), the insert finds its seq taken, does nothing, and the
  append sets the head from the newest event, holding both locks, then appends again.
- On SQLite every writing transaction starts with ``BEGIN IMMEDIATE``, which already
  admits one writer at a time: an append reads the newest event and inserts after it.
  The head row is not used there.

The primary key on ``seq`` refuses a duplicate should anything slip through.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.models import AuditChainHead, AuditEvent
from soko.platform.clock import Clock, ensure_utc
from soko.platform.http import client_ip
from soko.platform.ids import uuid7
from soko.platform.logging import REDACTED, mask_field

if TYPE_CHECKING:
    from starlette.requests import Request

    from soko.platform.runtime import Runtime

GENESIS_HASH = "0" * 64
# A fixed key for pg_advisory_xact_lock: the first 8 bytes of SHA-256("soko.audit_events"),
# as a signed 64-bit integer. Any constant works as long as nothing else uses it.
AUDIT_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"soko.audit_events").digest()[:8], "big", signed=True
)
VERIFY_BATCH_SIZE = 2000

# The table under the model, for the plain Core INSERT of an append.
_AUDIT_EVENTS = cast(Table, AuditEvent.__table__)

_CHAIN_COLUMNS = (
    AuditEvent.seq,
    AuditEvent.id,
    AuditEvent.occurred_at,
    AuditEvent.action,
    AuditEvent.actor_id,
    AuditEvent.target_type,
    AuditEvent.target_id,
    AuditEvent.ip,
    AuditEvent.request_id,
    AuditEvent.data,
    AuditEvent.prev_hash,
    AuditEvent.hash,
)


# -- the canonical form ----------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    """``value`` as plain JSON types, so what is hashed is exactly what the database
    hands back later (a UUID or datetime would come back as a string)."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_ready(item) for item in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("audit data cannot hold NaN or infinity")
        return float(value)
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return _iso(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return str(value)


# Keys naming a code that is not a secret; any other ``*_code``/``*_codes`` key is
# redacted (recovery codes, one-time codes), beyond what the log mask already hides.
_PLAIN_CODE_KEYS = frozenset(
    {
        "status_code",
        "error_code",
        "reason_code",
        "country_code",
        "currency_code",
        "language_code",
        "postal_code",
        "zip_code",
    }
)


def _is_secret_key(key: str) -> bool:
    if mask_field(key, "probe") == REDACTED:
        return True
    lowered = key.lower().replace("-", "_")
    if lowered in _PLAIN_CODE_KEYS:
        return False
    return lowered.endswith(("code", "codes"))


def _mask_entry(key: str, value: Any) -> Any:
    if _is_secret_key(key):
        return REDACTED
    if isinstance(value, dict):
        return {name: _mask_entry(name, item) for name, item in value.items()}
    if isinstance(value, list):
        return [_mask_entry(key, item) for item in value]
    return mask_field(key, value)


def mask_audit_data(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data`` as it is stored: secrets (passwords, tokens, codes, keys) redacted,
    emails and phone numbers reduced to what a log line shows, in plain JSON types."""
    if not data:
        return {}
    ready: dict[str, Any] = _json_ready(data)
    return {key: _mask_entry(key, value) for key, value in ready.items()}


def _iso(moment: dt.datetime) -> str:
    return ensure_utc(moment).isoformat(timespec="microseconds")


def event_hash(
    *,
    seq: int,
    id: uuid.UUID,
    occurred_at: dt.datetime,
    action: str,
    actor_id: uuid.UUID | None,
    target_type: str | None,
    target_id: str | None,
    ip: str | None,
    request_id: str | None,
    data: Any,
    prev_hash: str,
) -> str:
    """The SHA-256 (hex) of one event's canonical JSON, chained to ``prev_hash``: the JSON
    object of every field above, keys sorted, no spaces, UTF-8, UUIDs and times as text
    (:func:`canonical_parts` writes it)."""
    prefix, middle, suffix = canonical_parts(
        id=id,
        occurred_at=occurred_at,
        action=action,
        actor_id=actor_id,
        target_type=target_type,
        target_id=target_id,
        ip=ip,
        request_id=request_id,
        data=data,
    )
    whole = prefix + prev_hash.encode("utf-8") + middle + str(seq).encode("utf-8") + suffix
    return hashlib.sha256(whole).hexdigest()


# json.dumps with these options, built once (json.dumps builds an encoder per call).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_canonical_json = _CANONICAL.encode


def canonical_parts(
    *,
    id: uuid.UUID,
    occurred_at: dt.datetime,
    action: str,
    actor_id: uuid.UUID | None,
    target_type: str | None,
    target_id: str | None,
    ip: str | None,
    request_id: str | None,
    data: Any,
) -> tuple[bytes, bytes, bytes]:
    """An event's canonical form (what :func:`event_hash` hashes, UTF-8) cut around the
    two fields only the chain's head knows: ``prefix + prev_hash + middle + seq +
    suffix``, with ``prev_hash`` in hex and ``seq`` in decimal, is the whole.

    Python hashes the pieces so joined (:func:`event_hash`); PostgreSQL's appends join
    and hash the same pieces. The canonical form is a JSON object with sorted keys, so
    the cuts fall where ``prev_hash`` and ``seq`` sit in that order; each other value is
    written as ``json.dumps`` of the whole object would write it (the same options)."""
    write = _canonical_json
    prefix = (
        f'{{"action":{write(action)},"actor_id":{write(_id_text(actor_id))},'
        f'"data":{write(data)},"id":{write(str(id))},"ip":{write(ip)},'
        f'"occurred_at":{write(_iso(occurred_at))},"prev_hash":"'
    )
    middle = f'","request_id":{write(request_id)},"seq":'
    suffix = f',"target_id":{write(target_id)},"target_type":{write(target_type)}}}'
    return prefix.encode("utf-8"), middle.encode("utf-8"), suffix.encode("utf-8")


def _id_text(value: uuid.UUID | None) -> str | None:
    return str(value) if value is not None else None


_CONTENT_FIELDS = (
    "id",
    "occurred_at",
    "action",
    "actor_id",
    "target_type",
    "target_id",
    "ip",
    "request_id",
    "data",
)


def _content(event: Any) -> dict[str, Any]:
    """An event's fields but the two the chain gives it (``seq``, ``prev_hash``), from an
    :class:`AuditEvent` or a row of its columns: what :func:`canonical_parts` takes."""
    return {name: getattr(event, name) for name in _CONTENT_FIELDS}


# -- appending -------------------------------------------------------------------------


# The statements of an append, built once: every sign-in runs them.
_HEAD = select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
_APPEND = insert(_AUDIT_EVENTS)

# PostgreSQL: the whole append in one statement (see the module's docstring). In an
# UPDATE's SET every column names the row as it was, so the new hash chains on the old.
# A parameter is cast where it is used, so PostgreSQL knows its type.
_PG_APPEND = text(
    """WITH head AS (
    UPDATE audit_chain_head AS h
    SET seq = h.seq + 1,
        prev_hash = h.hash,
        hash = encode(
            sha256(
                CAST(:prefix AS BYTEA) || convert_to(h.hash, 'UTF8')
                || CAST(:middle AS BYTEA) || convert_to(CAST(h.seq + 1 AS TEXT), 'UTF8')
                || CAST(:suffix AS BYTEA)
            ),
            'hex'
        )
    FROM (SELECT pg_advisory_xact_lock(:lock_key)) AS appending
    WHERE h.id = 1
    RETURNING h.seq, h.prev_hash, h.hash
)
INSERT INTO audit_events
    (seq, id, occurred_at, action, actor_id, target_type, target_id, ip, request_id, data,
     prev_hash, hash)
SELECT head.seq, CAST(:id AS UUID), CAST(:occurred_at AS TIMESTAMP WITH TIME ZONE),
       CAST(:action AS VARCHAR), CAST(:actor_id AS UUID), CAST(:target_type AS VARCHAR),
       CAST(:target_id AS VARCHAR), CAST(:ip AS VARCHAR), CAST(:request_id AS VARCHAR),
       CAST(:data AS JSON), head.prev_hash, head.hash
FROM head
ON CONFLICT (seq) DO NOTHING
RETURNING seq, prev_hash, hash
"""
)
# The head row set from the newest event (or the chain's start), once an append found it
# missing or behind. Run holding the advisory lock and, when the row exists, its lock:
# no append can be under way, so this statement's snapshot holds every event.
_PG_RESET_HEAD = text(
    """INSERT INTO audit_chain_head (id, seq, prev_hash, hash)
SELECT 1, COALESCE(newest.seq, 0), COALESCE(newest.prev_hash, :genesis),
       COALESCE(newest.hash, :genesis)
FROM (SELECT 1) AS one
LEFT JOIN (
    SELECT seq, prev_hash, hash FROM audit_events ORDER BY seq DESC LIMIT 1
) AS newest ON true
ON CONFLICT (id) DO UPDATE
SET seq = excluded.seq, prev_hash = excluded.prev_hash, hash = excluded.hash
"""
)
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


# session.info key: the chain head this session's current transaction appended, as
# (transaction, seq, hash). The append lock is held until that transaction ends, so no
# other writer can have moved the head since: a second event in the same transaction (a
# sign-in from a new device records two) needs neither the lock nor the read again.
_HEAD_KEY = "soko.audit.head"


def _current_transaction(session: AsyncSession) -> object | None:
    # The innermost one: an event appended inside a savepoint that later rolls back must
    # not be taken for the head afterwards, so a savepoint's memo ends with it.
    sync_session = session.sync_session
    return sync_session.get_nested_transaction() or sync_session.get_transaction()


async def _chain_head(session: AsyncSession) -> tuple[int, str]:
    """SQLite: the last (seq, hash) of the chain. The session's BEGIN IMMEDIATE holds
    the database's one write lock until its transaction ends."""
    remembered = session.info.get(_HEAD_KEY)
    if remembered is not None:
        transaction, seq, head_hash = remembered
        if transaction() is not None and transaction() is _current_transaction(session):
            return seq, head_hash
    last = (await session.execute(_HEAD)).first()
    return (last.seq, last.hash) if last is not None else (0, GENESIS_HASH)


def _remember_head(session: AsyncSession, seq: int, head_hash: str) -> None:
    transaction = _current_transaction(session)
    if transaction is not None:
        session.info[_HEAD_KEY] = (weakref.ref(transaction), seq, head_hash)


async def record_request_audit_event(
    session: AsyncSession,
    request: Request,
    runtime: Runtime,
    *,
    action: str,
    actor_id: uuid.UUID | None,
    target_type: str,
    target_id: str | uuid.UUID,
    data: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """:func:`record_audit_event` for what a request did: its caller's address
    (``X-Forwarded-For`` believed only from trusted proxies) and its request id."""
    return await record_audit_event(
        session,
        action=action,
        actor_id=actor_id,
        target_type=target_type,
        target_id=target_id,
        ip=client_ip(request.scope, runtime.settings.trusted_proxies),
        request_id=getattr(request.state, "request_id", None),
        data=data,
        clock=runtime.clock,
    )


async def record_audit_event(
    session: AsyncSession,
    *,
    action: str,
    actor_id: uuid.UUID | None = None,
    target_type: str | None = None,
    target_id: str | uuid.UUID | None = None,
    ip: str | None = None,
    request_id: str | None = None,
    data: Mapping[str, Any] | None = None,
    clock: Clock,
) -> AuditEvent:
    """Append one event to the audit log in the caller's transaction.

    ``action`` is a dotted name (``auth.login_failed``, ``user.blocked``); ``actor_id``
    who did it (``None`` for the anonymous or the system); ``target_type`` and
    ``target_id`` what it was done to. ``data`` is masked before it is stored: never
    rely on it to keep a secret, and never put one in. The event commits or rolls back
    with the caller's transaction; until then it holds the audit log's append lock."""
    event = AuditEvent(
        id=uuid7(),
        occurred_at=ensure_utc(clock.now()),
        action=action,
        actor_id=actor_id,
        target_type=target_type,
        target_id=str(target_id) if target_id is not None else None,
        ip=ip,
        request_id=request_id,
        data=mask_audit_data(data),
    )
    # Written now (the event is never changed afterwards, so the unit of work has
    # nothing to track): the primary key on seq refuses a duplicate here, at the
    # append, and code reading the log later in the transaction finds the event. The
    # caller's pending changes are flushed first, as an ORM add would have.
    await session.flush()
    if session.get_bind().dialect.name == "postgresql":
        await _append_on_postgresql(session, event)
        return event
    event.seq, event.prev_hash = await _chain_head(session)
    event.seq += 1
    event.hash = event_hash(seq=event.seq, prev_hash=event.prev_hash, **_content(event))
    await session.execute(
        _APPEND, {column.key: getattr(event, column.key) for column in _CHAIN_COLUMNS}
    )
    _remember_head(session, event.seq, event.hash)
    return event


async def _append_on_postgresql(session: AsyncSession, event: AuditEvent) -> None:
    """Append ``event`` in one statement, filling in its seq, prev_hash and hash; set
    the head row from the newest event first when the append finds it missing or
    behind (then the append runs again, once)."""
    prefix, middle, suffix = canonical_parts(**_content(event))
    parameters = {
        "prefix": prefix,
        "middle": middle,
        "suffix": suffix,
        "lock_key": AUDIT_LOCK_KEY,
        "id": event.id,
        "occurred_at": event.occurred_at,
        "action": event.action,
        "actor_id": event.actor_id,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "ip": event.ip,
        "request_id": event.request_id,
        "data": json.dumps(event.data),
    }
    for attempt in range(2):
        appended = (await session.execute(_PG_APPEND, parameters)).first()
        if appended is not None:
            event.seq, event.prev_hash, event.hash = appended
            return
        if attempt == 0:
            # Missing or behind: the update (if any) holds the row, the statement took
            # the advisory lock, so no other append can move the chain meanwhile.
            await session.execute(_LOCK, {"key": AUDIT_LOCK_KEY})
            await session.execute(_PG_RESET_HEAD, {"genesis": GENESIS_HASH})
    raise RuntimeError("the audit chain's head could not be set from its newest event")


# -- verifying -------------------------------------------------------------------------


class ChainBreak(StrEnum):
    gap = "gap"  # an event is missing (deleted) or out of place, or the newest cut off
    prev_hash_mismatch = "prev_hash_mismatch"  # linked to something other than its predecessor
    hash_mismatch = "hash_mismatch"  # its content no longer matches its hash
    head_mismatch = "head_mismatch"  # not the event the head row recorded at its seq


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What :func:`verify_audit_chain` found.

    ``checked`` counts the events verified intact before the first break (all of them
    when ``ok``). ``broken_seq`` is the first seq at which the chain fails: for a gap,
    the first missing seq. ``last_seq``/``last_hash`` are the head of the intact part."""

    ok: bool
    checked: int
    broken_seq: int | None = None
    reason: ChainBreak | None = None
    detail: str = ""
    last_seq: int | None = None
    last_hash: str | None = None


async def audit_chain_length(session: AsyncSession) -> int:
    """The highest seq: what a full verification walks through (cheap: the primary key)."""
    value = (await session.execute(select(func.max(AuditEvent.seq)))).scalar_one_or_none()
    return int(value or 0)


async def verify_audit_chain(
    session: AsyncSession,
    *,
    batch_size: int = VERIFY_BATCH_SIZE,
    on_progress: Callable[[int], None] | None = None,
) -> ChainReport:
    """Walk the whole chain in ``seq`` order, ``batch_size`` events at a time, and report
    the first break. Plain rows, not ORM objects: a million events never sit in memory
    together. ``on_progress`` is called with the count checked after each batch.

    On PostgreSQL the head row (read first, so appends made during the walk only add
    events after it) also names the newest event the chain had: a chain that ends
    before it lost its newest events, and an event at its seq with another hash was
    replaced. A head row behind the chain says nothing (events appended without it)."""
    head = (await session.execute(select(AuditChainHead.seq, AuditChainHead.hash))).first()
    head_hash_seen: str | None = None
    expected_seq = 1
    prev_hash = GENESIS_HASH
    checked = 0
    last_seq: int | None = None
    while True:
        batch = select(*_CHAIN_COLUMNS).order_by(AuditEvent.seq).limit(batch_size)
        if last_seq is not None:
            batch = batch.where(AuditEvent.seq > last_seq)
        rows = (await session.execute(batch)).all()
        if not rows:
            break
        for row in rows:
            broken = _check(row, expected_seq, prev_hash)
            if broken is not None:
                reason, detail = broken
                return ChainReport(
                    ok=False,
                    checked=checked,
                    broken_seq=expected_seq if reason is ChainBreak.gap else row.seq,
                    reason=reason,
                    detail=detail,
                    last_seq=last_seq,
                    last_hash=prev_hash if last_seq is not None else None,
                )
            checked += 1
            last_seq = row.seq
            prev_hash = row.hash
            expected_seq = row.seq + 1
            if head is not None and row.seq == head.seq:
                head_hash_seen = row.hash
        if on_progress is not None:
            on_progress(checked)
        if len(rows) < batch_size:
            break
    if head is not None and head.seq > 0:
        broken = _against_head(head.seq, head.hash, head_hash_seen, last_seq)
        if broken is not None:
            reason, detail = broken
            return ChainReport(
                ok=False,
                checked=checked,
                broken_seq=(last_seq or 0) + 1 if reason is ChainBreak.gap else head.seq,
                reason=reason,
                detail=detail,
                last_seq=last_seq,
                last_hash=prev_hash if last_seq is not None else None,
            )
    return ChainReport(
        ok=True,
        checked=checked,
        last_seq=last_seq,
        last_hash=prev_hash if last_seq is not None else None,
    )


def _against_head(
    head_seq: int, head_hash: str, seen_hash: str | None, last_seq: int | None
) -> tuple[ChainBreak, str] | None:
    if last_seq is None or last_seq < head_seq:
        return ChainBreak.gap, (
            f"the chain ends at seq {last_seq or 0}, but its head row records seq {head_seq}: "
            "the newest events were removed"
        )
    if seen_hash != head_hash:
        return ChainBreak.head_mismatch, (
            f"the event at seq {head_seq} is not the one the head row recorded"
        )
    return None


def _check(row: Any, expected_seq: int, prev_hash: str) -> tuple[ChainBreak, str] | None:
    if row.seq != expected_seq:
        return ChainBreak.gap, f"expected seq {expected_seq}, found {row.seq}"
    if row.prev_hash != prev_hash:
        return ChainBreak.prev_hash_mismatch, (
            "its prev_hash is not the hash of the event before it"
        )
    computed = event_hash(seq=row.seq, prev_hash=row.prev_hash, **_content(row))
    if computed != row.hash:
        return ChainBreak.hash_mismatch, "its content does not match its hash"
    return None
