"""Idempotency keys: a retried unsafe request gets the first answer, never a second effect.

A client that sends ``Idempotency-Key: <key>`` with a POST that moves money or claims
capacity (a checkout, a payment, a refund, a booking) may send it again after a timeout or
a lost connection without doing the thing twice:

* the same key with the same request replays the first answer, with
  ``Idempotency-Replayed: true``;
* the same key with a different request (another body, another path) is 422
  ``idempotency-key-reused``;
* the same key while the first request is still running is 409 ``idempotency-in-flight``.

Keys are scoped per client (the user, or the API key, that sent them), so two clients can
never see each other's answers, and kept for ``SOKO_IDEMPOTENCY_KEY_HOURS``.

How it holds under concurrency: the key is *claimed* first, in a short transaction of its
own that commits at once (``INSERT ... ON CONFLICT DO NOTHING`` on ``UNIQUE(scope, key)``),
so a second request with the key sees the claim whatever else is running. The route then
does its work in the request's transaction and stores its answer on the claim in **that
same transaction** (:meth:`IdempotentRequest.answer`): the effect and the stored answer
commit together or not at all. A request that fails (an exception, a 5xx, a failed
commit) gives the claim up so a retry can run; a 4xx answer is stored and replayed like
a success, since the same request would be refused the same way. A claim whose process
died is taken over once its lease (``locked_until``) runs out.

A route::

    @router.post("/checkout", status_code=201)
    async def checkout(
        principal: SignedIn,
        claim: IdempotencyDep,  # before anything that uses the session
        session: SessionDep,
        body: CheckoutIn,
    ) -> Response:
        if claim.replay is not None:
            return claim.replay
        group = await service.checkout(session, ...)
        return await claim.answer(session, GroupOut.of(group), status_code=201)

Declare :data:`IdempotencyDep` before any dependency that queries through the request's
session: on SQLite the claim's own transaction needs the write lock, which the request's
transaction would otherwise already hold.

A route whose change is one statement on PostgreSQL can store its answer in that
statement instead, with no transaction at all: :meth:`IdempotentRequest.answer_parameters`
gives the answer and its parameters, :func:`held_claim_statement` locks the claim (a CTE
the change's writes depend on) and :func:`answering_statement` stores the answer; then
:meth:`IdempotentRequest.answered_with` the stored answer, or raise
:meth:`IdempotentRequest.taken_over` when the claim was not held (the checkout does so,
ADR 0017).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any

import structlog
from fastapi import Depends, Header, Request
from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    CheckConstraint,
    Index,
    String,
    UniqueConstraint,
    bindparam,
    delete,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column
from starlette.responses import JSONResponse, Response

from soko.platform.auth import current_principal_or_none
from soko.platform.db import Base, Database, UUIDPrimaryKey, dialect_insert
from soko.platform.errors import (
    PROBLEM_MEDIA_TYPE,
    ProblemError,
    Unauthorized,
    ValidationFailed,
    problem_body,
)
from soko.platform.ids import uuid7
from soko.platform.jobs import JobContext, registry
from soko.platform.runtime import get_runtime

log = structlog.get_logger("soko.idempotency")

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotency-Replayed"
KEY_MAX_LENGTH = 255
SCOPE_MAX_LENGTH = 100
# How long a claim is protected while its request runs. A request that takes longer
# than this (or whose process died) may be taken over by a retry; the lease is the
# longest a client waits after a crash before its retry can run.
LEASE = dt.timedelta(seconds=60)
PURGE_BATCH = 10_000
PURGE_JOB = "platform.idempotency.purge_expired"


class KeyStatus(StrEnum):
    in_flight = "in_flight"  # claimed; the request is running
    done = "done"  # answered; the answer is replayed


class IdempotencyKey(UUIDPrimaryKey, Base):
    """A client's idempotency key, its request's fingerprint and, once answered, the answer."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("scope", "key"),
        CheckConstraint(
            f"status IN ({', '.join(repr(s.value) for s in KeyStatus)})", name="status"
        ),
        CheckConstraint("status <> 'done' OR response_status IS NOT NULL", name="done_has_answer"),
        # The purge job: keys past their time.
        Index("ix_idempotency_keys_expires_at", "expires_at"),
    )

    scope: Mapped[str] = mapped_column(String(SCOPE_MAX_LENGTH))
    key: Mapped[str] = mapped_column(String(KEY_MAX_LENGTH))
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    # Who holds the claim now: set anew on every claim and take-over, and required to
    # store the answer or give the claim up, so a request whose lease ran out and was
    # taken over cannot overwrite the new holder's work.
    claim_token: Mapped[uuid.UUID]
    response_status: Mapped[int | None] = mapped_column(default=None)
    # Plain JSON (not JSONB) on PostgreSQL: it keeps the text as written, so a replay
    # is the first answer byte for byte.
    response_body: Mapped[Any] = mapped_column(JSON, default=None)
    response_headers: Mapped[dict[str, str] | None] = mapped_column(JSON, default=None)
    locked_until: Mapped[dt.datetime]
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]


# -- problems ------------------------------------------------------------------------------------


class IdempotencyKeyRequired(ProblemError):
    slug = "idempotency-key-required"
    title = "An Idempotency-Key is required"
    status = 400
    description = (
        "This request moves money or claims capacity: send an `Idempotency-Key` header "
        "(1 to 255 printable ASCII characters, a new random value per operation) so a retry "
        "cannot do it twice."
    )


class IdempotencyKeyReused(ProblemError):
    slug = "idempotency-key-reused"
    title = "This Idempotency-Key was used for another request"
    status = 422
    description = (
        "The key was first sent with a different request (another body or another path). "
        "A key names one operation: use a new key for a new request."
    )


class IdempotencyInFlight(ProblemError):
    slug = "idempotency-in-flight"
    title = "A request with this Idempotency-Key is still running"
    status = 409
    description = (
        "The first request sent with this key has not finished. Retry after `Retry-After` "
        "seconds: you will get its answer."
    )


# -- fingerprints and stored answers -------------------------------------------------------------


def request_fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """The SHA-256 of what makes two requests "the same": method, path, query string and
    body. A JSON body is canonicalized first (sorted keys, no spaces), so a client that
    serializes the same object differently on a retry is not refused."""
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except (ValueError, UnicodeDecodeError):
        canonical = body
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), query.encode()):
        digest.update(part)
        digest.update(b"\x00")
    digest.update(canonical)
    return digest.hexdigest()


def check_key(key: str | None) -> str:
    """``key`` if it is 1 to 255 printable ASCII characters; the problem otherwise."""
    if key is None or not key.strip():
        raise IdempotencyKeyRequired(
            f"Send an {IDEMPOTENCY_KEY_HEADER} header: a new random value (a UUID) per "
            "operation, the same value when you retry it."
        )
    if len(key) > KEY_MAX_LENGTH or not all(" " <= char <= "~" for char in key):
        raise ValidationFailed.of_field(
            IDEMPOTENCY_KEY_HEADER,
            f"must be 1 to {KEY_MAX_LENGTH} printable ASCII characters",
            location="header",
        )
    return key


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """An answer as it was first sent."""

    status_code: int
    body: Any
    headers: Mapping[str, str]

    def response(self, *, replayed: bool) -> JSONResponse:
        headers = {name: value for name, value in self.headers.items() if name != "content-type"}
        if replayed:
            headers[REPLAYED_HEADER] = "true"
        return JSONResponse(
            self.body,
            status_code=self.status_code,
            headers=headers,
            media_type=self.headers.get("content-type", "application/json"),
        )


def scope_of(user_id: uuid.UUID, api_key_id: uuid.UUID | None) -> str:
    """The namespace of a client's keys: its API key when it used one, else its user."""
    return f"api-key:{api_key_id}" if api_key_id is not None else f"user:{user_id}"


# -- claims ----------------------------------------------------------------------------------------


@dataclass
class IdempotentRequest:
    """A request's hold on its idempotency key.

    Either ``replay`` is the stored answer of an earlier request with this key (return
    it as it is), or the key is claimed for this request: do the work, then
    :meth:`answer` in the same transaction."""

    scope: str
    key: str
    id: uuid.UUID | None = None
    token: uuid.UUID | None = None
    replay: Response | None = None
    # The token of the request this one took the claim over from (its holder died or
    # ran past its lease): whatever that request set aside under its token and never
    # answered for can be given back.
    previous_token: uuid.UUID | None = None
    answered: bool = field(default=False, init=False)

    async def answer(
        self,
        session: AsyncSession,
        body: Any,
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> JSONResponse:
        """Store ``body`` (a Pydantic model or JSON value) as the answer to this key in
        ``session``'s transaction, the one that made the change, and return it as the
        response. Raises :class:`IdempotencyInFlight` when the claim is no longer this
        request's (its lease ran out and a retry took it over): the transaction must
        then roll back, since the other request does the work."""
        stored, parameters = self.answer_parameters(body, status_code=status_code, headers=headers)
        if not await _store(session, parameters):
            raise self.taken_over()
        return self.answered_with(stored)

    def answer_parameters(
        self, body: Any, *, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> tuple[StoredAnswer, dict[str, Any]]:
        """The answer :meth:`answer` would store, and the parameters of
        :func:`answering_statement` and :func:`held_claim_statement` for it: for a route
        that stores its answer inside the one statement that makes its change (then
        :meth:`answered_with`, or :meth:`taken_over` when the claim was not held)."""
        if self.replay is not None or self.id is None or self.token is None:
            raise RuntimeError("a replayed request has nothing to answer")
        if isinstance(body, BaseModel):
            body = body.model_dump(mode="json")
        stored = StoredAnswer(status_code, body, dict(headers or {}))
        return stored, _store_parameters(self.id, self.token, stored)

    def answered_with(self, stored: StoredAnswer) -> JSONResponse:
        """``stored`` was stored on the claim: the response to send."""
        self.answered = True
        return stored.response(replayed=False)

    @staticmethod
    def taken_over() -> IdempotencyInFlight:
        """The claim is no longer this request's (its lease ran out and a retry took it
        over): raise this, and make sure nothing of this request's change commits."""
        return IdempotencyInFlight(
            "Another request took over this Idempotency-Key; retry to get its answer.",
            headers={"Retry-After": "1"},
        )


# The two statements every idempotent request runs, built once with bind parameters:
# built per request, SQLAlchemy spent more CPU constructing them than running them.
_KEYS: Any = IdempotencyKey.__table__


@lru_cache(maxsize=2)
def _claim_statement(dialect: str) -> Any:
    """Insert a fresh claim (every column a bind parameter of its name), or nothing when
    the scope already holds the key."""
    insert = dialect_insert(dialect)
    return (
        insert(_KEYS).on_conflict_do_nothing(index_elements=["scope", "key"]).returning(_KEYS.c.id)
    )


@lru_cache(maxsize=1)
def _store_statement() -> Any:
    """Store an answer on the claim ``claim_id`` still held with ``token``."""
    return (
        update(_KEYS)
        .where(
            _KEYS.c.id == bindparam("claim_id"),
            _KEYS.c.claim_token == bindparam("token"),
            _KEYS.c.status == KeyStatus.in_flight.value,
        )
        .values(
            status=KeyStatus.done.value,
            response_status=bindparam("v_status", type_=_KEYS.c.response_status.type),
            response_body=bindparam("v_body", type_=_KEYS.c.response_body.type),
            response_headers=bindparam("v_headers", type_=_KEYS.c.response_headers.type),
        )
        .returning(_KEYS.c.id)
    )


async def claim_key(
    db: Database,
    *,
    scope: str,
    key: str,
    fingerprint: str,
    now: dt.datetime,
    ttl: dt.timedelta,
    lease: dt.timedelta = LEASE,
) -> IdempotentRequest:
    """Claim ``key`` of ``scope`` for a request with ``fingerprint``, outside the
    request's transaction: the claim is committed before this returns. Returns the
    claim, or the earlier answer to replay; raises :class:`IdempotencyKeyReused` or
    :class:`IdempotencyInFlight`."""
    token = uuid7()
    fresh = {
        "request_hash": fingerprint,
        "status": KeyStatus.in_flight.value,
        "claim_token": token,
        "response_status": None,
        "response_body": None,
        "response_headers": None,
        "locked_until": now + lease,
        "created_at": now,
        "expires_at": now + ttl,
    }
    # A claim released between the insert and the read (its request answered an error
    # that is not kept) leaves no row to read: the insert is tried again.
    for _ in range(_CLAIM_TRIES):
        claimed = await _claim_once(db, scope, key, fingerprint, fresh, token, now, lease)
        if claimed is not None:
            return claimed
    raise _in_flight()


_CLAIM_TRIES = 3


async def _claim_once(
    db: Database,
    scope: str,
    key: str,
    fingerprint: str,
    fresh: dict[str, Any],
    token: uuid.UUID,
    now: dt.datetime,
    lease: dt.timedelta,
) -> IdempotentRequest | None:
    """:func:`claim_key`'s work, or ``None`` when the key's row vanished between the
    insert that found it and the read of it."""
    table = IdempotencyKey
    # A new key, nearly always: one statement, whole on its own.
    async with db.writing_once() as connection:
        inserted = (
            await connection.execute(
                _claim_statement(connection.dialect.name),
                {"id": uuid7(), "scope": scope, "key": key, **fresh},
            )
        ).scalar_one_or_none()
    if inserted is not None:
        return IdempotentRequest(scope, key, id=inserted, token=token)
    # The key was used before: read its state and decide, in a transaction.
    async with db.transaction() as session:
        row = (
            await session.execute(
                select(
                    table.id,
                    table.request_hash,
                    table.status,
                    table.claim_token,
                    table.response_status,
                    table.response_body,
                    table.response_headers,
                    table.locked_until,
                    table.expires_at,
                ).where(table.scope == scope, table.key == key)
            )
        ).one_or_none()
        if row is None:
            return None
        if row.expires_at <= now:
            # Forgotten by now (the purge job has not come by yet): a new request.
            renewed = update(table).where(table.id == row.id, table.expires_at <= now)
            return await _take(session, renewed.values(**fresh), scope, key, token)
        if row.request_hash != fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was first used for a different request; use a new "
                "key for a new request."
            )
        if row.status == KeyStatus.done.value:
            answer = StoredAnswer(row.response_status, row.response_body, row.response_headers)
            return IdempotentRequest(scope, key, replay=answer.response(replayed=True))
        if row.locked_until > now:
            raise _in_flight()
        # The holder died, or ran past its lease: the retry takes the claim over.
        takeover = update(table).where(
            table.id == row.id,
            table.status == KeyStatus.in_flight.value,
            table.claim_token == row.claim_token,
        )
        return await _take(
            session,
            takeover.values(claim_token=token, locked_until=now + lease),
            scope,
            key,
            token,
            previous_token=row.claim_token,
        )


async def _take(
    session: AsyncSession,
    statement: Any,
    scope: str,
    key: str,
    token: uuid.UUID,
    *,
    previous_token: uuid.UUID | None = None,
) -> IdempotentRequest:
    taken = (
        await session.execute(
            statement.returning(IdempotencyKey.id).execution_options(synchronize_session=False)
        )
    ).scalar_one_or_none()
    if taken is None:  # another retry took it first
        raise _in_flight()
    return IdempotentRequest(scope, key, id=taken, token=token, previous_token=previous_token)


def _in_flight() -> IdempotencyInFlight:
    # A second, not the rest of the lease: the first request is nearly always about to
    # finish (or has, and is storing a refusal), and a retry costs one indexed read.
    return IdempotencyInFlight(
        "A request with this Idempotency-Key is still running; retry shortly for its answer.",
        headers={"Retry-After": "1"},
    )


async def store_answer(
    session: AsyncSession | AsyncConnection,
    claim_id: uuid.UUID,
    token: uuid.UUID,
    answer: StoredAnswer,
) -> bool:
    """Store ``answer`` on the claim in ``session``'s transaction (or on a connection);
    false when the claim is no longer held with ``token``."""
    return await _store(session, _store_parameters(claim_id, token, answer))


async def _store(session: AsyncSession | AsyncConnection, parameters: dict[str, Any]) -> bool:
    connection = await session.connection() if isinstance(session, AsyncSession) else session
    stored = await connection.execute(_store_statement(), parameters)
    return stored.first() is not None


def _store_parameters(
    claim_id: uuid.UUID, token: uuid.UUID, answer: StoredAnswer
) -> dict[str, Any]:
    return {
        "claim_id": claim_id,
        "token": token,
        "v_status": answer.status_code,
        "v_body": answer.body,
        "v_headers": dict(answer.headers),
    }


def held_claim_statement() -> Any:
    """``SELECT`` the claim ``claim_id`` if it is still held with ``token``, ``FOR
    UPDATE``: for a route whose change and answer are one statement (PostgreSQL), a CTE
    whose row, locked, keeps a retry from taking the claim over until it commits. Its
    parameters come from :meth:`IdempotentRequest.answer_parameters`."""
    return (
        select(_KEYS.c.id)
        .where(
            _KEYS.c.id == bindparam("claim_id"),
            _KEYS.c.claim_token == bindparam("token"),
            _KEYS.c.status == KeyStatus.in_flight.value,
        )
        .with_for_update()
    )


def answering_statement() -> Any:
    """The ``UPDATE`` that stores an answer on the claim (``RETURNING`` its id), for the
    same statement as :func:`held_claim_statement`."""
    return _store_statement()


async def release_claim(db: Database, claim_id: uuid.UUID, token: uuid.UUID) -> None:
    """Give up a claim that was not answered, so a retry with the key runs afresh."""
    async with db.transaction() as session:
        await session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.id == claim_id,
                IdempotencyKey.claim_token == token,
                IdempotencyKey.status == KeyStatus.in_flight.value,
            )
        )


async def purge_expired(
    session: AsyncSession, now: dt.datetime, *, limit: int = PURGE_BATCH
) -> int:
    """Delete up to ``limit`` keys past their time (never one whose request still holds
    its lease); how many were deleted."""
    table = IdempotencyKey
    candidates = (
        select(table.id)
        .where(
            table.expires_at <= now,
            (table.status == KeyStatus.done.value) | (table.locked_until <= now),
        )
        .order_by(table.expires_at)
        .limit(limit)
    )
    deleted = await session.execute(
        delete(table)
        .where(table.id.in_(candidates.scalar_subquery()))
        .returning(table.id)
        .execution_options(synchronize_session=False)
    )
    return len(deleted.all())


@registry.schedule("*/15 * * * *", name=PURGE_JOB)
async def purge_expired_keys(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Forget keys older than ``SOKO_IDEMPOTENCY_KEY_HOURS``."""
    purged = await purge_expired(ctx.session, ctx.now())
    if purged:
        log.info("expired idempotency keys purged", count=purged)


# -- the FastAPI dependency ------------------------------------------------------------------------


def _request_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


async def _store_refusal(
    db: Database, request: Request, claim: IdempotentRequest, problem: ProblemError
) -> None:
    """Store a 4xx problem answer on the claim. The request's transaction rolled back
    (or committed what it kept), so this is a transaction of its own."""
    assert claim.id is not None and claim.token is not None
    body = problem_body(
        type(problem),
        detail=problem.detail,
        instance=request.url.path,
        request_id=_request_id(request),
        extensions=problem.extensions,
    )
    headers = {**problem.headers, "content-type": PROBLEM_MEDIA_TYPE}
    async with db.writing_once() as connection:
        await store_answer(
            connection, claim.id, claim.token, StoredAnswer(problem.status, body, headers)
        )


async def _give_up(db: Database, claim: IdempotentRequest) -> None:
    assert claim.id is not None and claim.token is not None
    try:
        await release_claim(db, claim.id, claim.token)
    except Exception:  # the lease runs out on its own: a retry waits at most that long
        log.exception("could not release an idempotency claim", scope=claim.scope)


async def _idempotent_request(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_KEY_HEADER,
            description="A new random value (a UUID) per operation, the same value on every "
            "retry of it: a retry then returns the first answer instead of acting twice.",
        ),
    ] = None,
) -> AsyncIterator[IdempotentRequest]:
    principal = await current_principal_or_none(request)
    if principal is None:
        raise Unauthorized(
            "Sign in first: send an access token or API key.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = check_key(idempotency_key)
    runtime = get_runtime(request)
    fingerprint = request_fingerprint(
        request.method, request.url.path, request.url.query, await request.body()
    )
    claim = await claim_key(
        runtime.db,
        scope=scope_of(principal.user_id, principal.api_key_id),
        key=key,
        fingerprint=fingerprint,
        now=runtime.clock.now(),
        ttl=dt.timedelta(hours=runtime.settings.idempotency_key_hours),
    )
    if claim.replay is not None:
        yield claim
        return
    # This dependency exits once the response is sent, after the request's transaction
    # has committed or rolled back (that one ends with the endpoint), so the outcome seen
    # here is final and the database is free for a transaction of our own.
    try:
        yield claim
    except ProblemError as problem:
        if 400 <= problem.status < 500:
            try:
                await _store_refusal(runtime.db, request, claim, problem)
            except Exception:
                log.exception("could not store a refusal on its idempotency key")
                await _give_up(runtime.db, claim)
        else:
            await _give_up(runtime.db, claim)
        raise
    except BaseException:
        await _give_up(runtime.db, claim)
        raise
    else:
        if not claim.answered:
            log.error(
                "an idempotent route answered without storing its answer", path=request.url.path
            )
            await _give_up(runtime.db, claim)


IdempotencyDep = Annotated[IdempotentRequest, Depends(_idempotent_request)]
"""The request's claim on its ``Idempotency-Key`` (required; 400 when missing)."""
