"""Database engine, sessions and the shared declarative base.

SQLite (through aiosqlite) is the embedded default and PostgreSQL (through asyncpg) the
scaled-out one; the same models and the same Alembic history serve both. SQLite gets WAL,
foreign keys and a busy timeout on every connection.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    ColumnElement,
    DateTime,
    Insert,
    MetaData,
    String,
    Table,
    Text,
    cast,
    event,
    exc,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SqlAlchemyTimeout
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import bindparam
from sqlalchemy.types import ARRAY, TypeDecorator, Uuid

from soko.platform import jsonbody
from soko.platform.ids import uuid7

# One naming convention for every constraint, so Alembic can name, find and drop them
# on SQLite (batch mode) and PostgreSQL alike.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no time zone type and hands back naive values; this type refuses naive
    input and always returns aware UTC values.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where an aware UTC datetime is required")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dt.datetime: UTCDateTime(),
        uuid.UUID: Uuid(),
    }


class UUIDPrimaryKey:
    """Mixin: a time-ordered UUIDv7 primary key generated in Python."""

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)


def sql_constant(value: str) -> ColumnElement[str]:
    """``value`` written into the SQL as a string literal instead of sent as a parameter,
    for the constants of a statement built once (``status = 'published'``).

    PostgreSQL plans a prepared statement with parameters anew on every execution while
    a plan for the values at hand looks cheaper than one for any value, and a status
    whose values are unevenly spread makes it so: the catalog's page statement cost the
    database twice the CPU with its two statuses sent as parameters. Written into the
    SQL, they leave one plan to keep."""
    return literal_column("'" + value.replace("'", "''") + "'", String())


class _JSONText(TypeDecorator[Any]):
    """A JSON column read as its text: on PostgreSQL the text passes into the answer
    unparsed (an ``orjson.Fragment``), elsewhere it is parsed as the column would be."""

    impl = Text
    cache_ok = True

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any]:
        # Chosen once per dialect, not for each of the hundred values of a page.
        if dialect.name == "postgresql":
            # PostgreSQL's json type accepts only valid JSON, so its text can be written
            # into a JSON answer as it is.
            fragment = orjson.Fragment

            def as_stored(value: Any) -> Any:
                return None if value is None else fragment(value)

            return as_stored
        # SQLite keeps any text in the column: parse it, so that text which is not JSON
        # fails the request instead of being sent as part of a JSON body.
        loads = jsonbody.loads

        def parsed(value: Any) -> Any:
            return None if value is None else loads(value)

        return parsed


def json_text(column: Any) -> ColumnElement[Any]:
    """``column`` (a JSON column) selected for serving as it is stored.

    A catalog page holds about a hundred JSON values (attributes, images, options), and
    parsing them only to write them out again was a sixth of the CPU of rendering the
    page. Selected through this, each value comes back as text (``CAST(... AS TEXT)``,
    so no JSON codec runs) and :func:`soko.platform.jsonbody.dumps` copies it into the
    body unparsed. The value written is the stored text: the same JSON, but with the
    spacing and escapes its writer chose. On SQLite the value is parsed (see
    ``_JSONText``). Only for values that go straight into an answer: code that reads the
    value must select the column itself."""
    return cast(column, _JSONText()).label(column.key)


async def lock_keys(session: AsyncSession, *keys: tuple[int, str]) -> None:
    """Hold a transaction-scoped advisory lock on each ``(space, key)`` until commit, in
    the order given (callers keep one order, so two never wait on each other in a
    cycle): ``space`` is an int4 constant naming what is locked, ``key`` any text. On
    SQLite nothing is needed: a write transaction already holds the only write lock."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for space, key in keys:
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:space, hashtext(:key))"),
            {"space": space, "key": key},
        )


def dialect_insert(where: str | AsyncSession | AsyncConnection) -> Any:
    """The ``insert`` of the dialect ``where`` speaks (a dialect name, a session or a
    connection): PostgreSQL's, else SQLite's. Both have ``on_conflict_do_nothing`` and
    ``on_conflict_do_update``, which the generic ``insert`` lacks."""
    if isinstance(where, str):
        name = where
    elif isinstance(where, AsyncSession):
        name = where.get_bind().dialect.name
    else:
        name = where.dialect.name
    return postgresql.insert if name == "postgresql" else sqlite.insert


def _is_json(column: Any) -> bool:
    return isinstance(column.type, JSON)  # JSONB is one too, and so is JSON with variants


def unnest_insert(table: Table, prefix: str, *, where: ColumnElement[bool] | None = None) -> Insert:
    """PostgreSQL: ``INSERT INTO <table> (<every column>) SELECT ... FROM unnest(<one
    array parameter per column>) [WHERE <where>]``: any number of rows in one statement
    built once, which can be a CTE of a larger statement (``.cte()``) and then write
    only if ``where`` holds. Its parameters are named ``<prefix><column>``: build them
    with :func:`unnest_parameters`. JSON columns travel as text and are cast back."""
    columns = list(table.columns)
    arrays = [
        bindparam(prefix + column.name, type_=ARRAY(Text() if _is_json(column) else column.type))
        for column in columns
    ]
    rows = func.unnest(*arrays).table_valued(*(c.name for c in columns)).render_derived()
    values = select(
        *(
            cast(rows.c[column.name], column.type) if _is_json(column) else rows.c[column.name]
            for column in columns
        )
    )
    if where is not None:
        values = values.where(where)
    return insert(table).from_select([column.name for column in columns], values)


def unnest_parameters(
    table: Table, prefix: str, rows: list[dict[str, Any]]
) -> dict[str, list[Any]]:
    """The parameters of :func:`unnest_insert` for ``rows`` (every column of each, by
    its key). A JSON column's None is written as a plain INSERT writes it: JSON
    ``null``, or SQL NULL where the type says ``none_as_null``."""
    parameters: dict[str, list[Any]] = {}
    for key, name, json_none in _unnest_columns(table):
        values = [row[key] for row in rows]
        if json_none is not False:
            values = [json_none if v is None else jsonbody.dumps(v).decode() for v in values]
        parameters[prefix + name] = values
    return parameters


@functools.lru_cache(maxsize=32)
def _unnest_columns(table: Table) -> tuple[tuple[str, str, str | bool | None], ...]:
    """Each column's key, name, and for a JSON column what None is written as (else
    False)."""
    return tuple(
        (
            column.key,
            column.name,
            (None if getattr(column.type, "none_as_null", False) else "null")
            if _is_json(column)
            else False,
        )
        for column in table.columns
    )


# A pooled PostgreSQL connection idle for longer than this is pinged before it is used
# again (see _check_out).
PING_AFTER_IDLE_SECONDS = 10.0


def create_engine(
    url: str,
    *,
    echo: bool = False,
    pool_size: int = 10,
    max_overflow: int = 10,
    statement_cache: bool = True,
    ping_after_idle_seconds: float = PING_AFTER_IDLE_SECONDS,
    statement_timeout_seconds: float = 0,
    idle_in_transaction_timeout_seconds: float = 0,
) -> AsyncEngine:
    """Create the async engine for ``url`` with the settings each backend needs.

    On PostgreSQL, ``statement_timeout_seconds`` and ``idle_in_transaction_timeout_seconds``
    (0: the server's own) are sent as each connection's ``statement_timeout`` and
    ``idle_in_transaction_session_timeout``."""
    kwargs: dict[str, Any] = {"echo": echo, "json_deserializer": jsonbody.loads}
    if url.startswith("sqlite"):
        in_memory = ":memory:" in url or url.rstrip("/").endswith("sqlite+aiosqlite:")
        if in_memory:
            raise ValueError("an in-memory SQLite database cannot be shared; use a file")
        # WAL lets readers run beside the one writer; the busy timeout absorbs contention.
        kwargs["connect_args"] = {"timeout": 30}
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
    else:
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
        connect_args: dict[str, Any] = {}
        if not statement_cache:
            # Needed behind PgBouncer in transaction mode.
            connect_args["statement_cache_size"] = 0
        server_settings = {
            name: f"{round(seconds * 1000)}ms"
            for name, seconds in (
                ("statement_timeout", statement_timeout_seconds),
                ("idle_in_transaction_session_timeout", idle_in_transaction_timeout_seconds),
            )
            if seconds > 0
        }
        if server_settings:
            connect_args["server_settings"] = server_settings
        if connect_args:
            kwargs["connect_args"] = connect_args
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
    else:
        event.listen(engine.sync_engine, "connect", _postgresql_on_connect)
        event.listen(engine.sync_engine, "checkin", _note_return)
        event.listen(
            engine.sync_engine,
            "checkout",
            functools.partial(_check_out, engine.dialect, ping_after_idle_seconds),
        )
    return engine


async def lift_statement_timeout(session: AsyncSession) -> None:
    """Let the rest of this transaction's statements run as long as they need, whatever
    the connection's or the role's ``statement_timeout`` (PostgreSQL; ``SET LOCAL``, so
    it ends with the transaction, also through PgBouncer): for an operator's check of a
    whole table, not for a request's work."""
    if (await session.connection()).dialect.name == "postgresql":
        await session.execute(text("SET LOCAL statement_timeout = 0"))


# -- reading JSON columns on PostgreSQL --------------------------------------------------
#
# SQLAlchemy's asyncpg dialect decodes every JSON value through a wrapper of its own that
# turns the bytes into a string before it calls the deserializer; a catalog page reads a
# hundred such values. Registered again once SQLAlchemy has set up the connection (this
# listener runs after the dialect's own), the codecs hand asyncpg's bytes straight to
# jsonbody.loads, which reads bytes as well as text. Writing is as SQLAlchemy does it.


def _postgresql_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.run_async(_register_json_codecs)


def _jsonb_encoder(text: str) -> bytes:
    return b"\x01" + text.encode()  # the version byte of JSONB's binary form


def _jsonb_decoder(data: bytes) -> Any:
    return jsonbody.loads(data[1:])  # after the version byte


async def _register_json_codecs(connection: Any) -> None:
    await connection.set_type_codec(
        "json", encoder=str.encode, decoder=jsonbody.loads, schema="pg_catalog", format="binary"
    )
    await connection.set_type_codec(
        "jsonb",
        encoder=_jsonb_encoder,
        decoder=_jsonb_decoder,
        schema="pg_catalog",
        format="binary",
    )


# -- checking a pooled PostgreSQL connection before use ------------------------------------
#
# SQLAlchemy's pool_pre_ping pings on every checkout, and its asyncpg ping is three round
# trips (BEGIN, a statement, ROLLBACK): more than most requests' own work. A connection
# can be dead in two ways, and each is caught without that:
#
# * the server closed it (a restart, a failover, idle_session_timeout, an administrator):
#   the server says so on the socket, the event loop reads it while the connection sits
#   in the pool, and asyncpg marks it closed: checked for free on every checkout;
# * something between us and the server dropped it without a word (a NAT or firewall
#   timeout, typically after minutes of silence): only a round trip can tell, so a
#   connection idle for longer than ``ping_after_idle_seconds`` is pinged first.
#
# Either way the pool replaces the connection and the request never sees it. A
# connection that dies while in use fails its statement, as it did with pre-ping, and
# SQLAlchemy then invalidates every connection pooled before it.

_RETURNED_AT = "soko.returned_at"


def _note_return(_dbapi_connection: Any, record: Any) -> None:
    record.info[_RETURNED_AT] = time.monotonic()


def _check_out(
    dialect: Dialect, ping_after_idle: float, dbapi_connection: Any, record: Any, _proxy: Any
) -> None:
    driver = getattr(dbapi_connection, "driver_connection", None)
    is_closed = getattr(driver, "is_closed", None)
    if callable(is_closed) and is_closed():
        raise exc.DisconnectionError("the server closed this pooled connection")
    returned = record.info.get(_RETURNED_AT)
    if returned is None or time.monotonic() - returned < ping_after_idle:
        return  # fresh from connect, or used a moment ago
    try:
        dialect.do_ping(dbapi_connection)
    except Exception as error:
        raise exc.DisconnectionError(
            f"a pooled connection idle for {time.monotonic() - returned:.0f} s did not "
            f"answer a ping ({type(error).__name__})"
        ) from error


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take over transaction control from the driver so BEGIN is ours (see _on_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


SQLITE_BEGIN_OPTION = "soko_sqlite_begin"


def _sqlite_on_begin(connection: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock up front: two transactions that read and then
    # write can no longer deadlock on the lock upgrade, and the busy timeout applies.
    # Sessions that only read (safe HTTP methods) ask for DEFERRED, so they never queue
    # behind a writer: WAL lets them read beside it.
    mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
    connection.exec_driver_sql("BEGIN DEFERRED" if mode == "DEFERRED" else "BEGIN IMMEDIATE")


def create_sessionmaker(
    engine: AsyncEngine, *, clock: Any = None, info: dict[str, Any] | None = None
) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded values after commit; ``session.info["clock"]`` is the
    process clock, so code holding only a session (the outbox) tells the same time, and
    ``info`` adds other process services the same way (the data keys)."""
    values = dict(info or {})
    if clock is not None:
        values["clock"] = clock
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=True, info=values)


class Database:
    """The engine and session factory of one process."""

    def __init__(
        self, engine: AsyncEngine, *, clock: Any = None, info: dict[str, Any] | None = None
    ) -> None:
        self.engine = engine
        self.sessionmaker = create_sessionmaker(engine, clock=clock, info=info)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """A session whose work commits when the block ends, or rolls back on error.

        ``read_only`` lets SQLite start a deferred transaction that does not wait for the
        write lock; it is a promise, not a guard: a write inside may fail as busy."""
        async with self.sessionmaker() as session:
            if read_only:
                await mark_read_only(session)
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise
            else:
                await session.commit()

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads that need no snapshot shared between them (a lookup or
        two on a hot path): plain Core statements, no session, nothing written.

        On PostgreSQL it runs in autocommit: at READ COMMITTED every statement takes its
        own snapshot anyway, so a transaction would only add the BEGIN and COMMIT round
        trips. On SQLite the reads share one deferred transaction beside the writer."""
        async with self.engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                yield await connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
            else:
                yield await connection.execution_options(isolation_level="AUTOCOMMIT")

    @asynccontextmanager
    async def writing_once(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one write that is whole on its own: a single statement such
        as an ``INSERT ... ON CONFLICT`` or a compare-and-set ``UPDATE``, which needs no
        transaction around it.

        On PostgreSQL it runs in autocommit, sparing the BEGIN and COMMIT round trips of
        a transaction of its own (twice the statement's). On SQLite it is an immediate
        transaction, committed when the block ends."""
        if self.engine.dialect.name == "sqlite":
            async with self.engine.begin() as connection:
                yield connection
        else:
            async with self.engine.connect() as connection:
                yield await connection.execution_options(isolation_level="AUTOCOMMIT")

    async def dispose(self) -> None:
        await self.engine.dispose()


async def mark_read_only(session: AsyncSession) -> None:
    """Start ``session``'s transaction as a reader (deferred on SQLite; no-op elsewhere).

    Call before the session first touches the database."""
    if session.bind is not None and session.bind.dialect.name == "sqlite":
        await session.connection(execution_options={SQLITE_BEGIN_OPTION: "DEFERRED"})


# The database cannot be reached or will not serve now: PostgreSQL's connection
# exceptions (class 08), shutdowns and start-ups (57P01-57P03), too many connections
# (53300), a database that is not there (3D000); SQLite's busy or unopenable file.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "3D000"})
_SQLITE_UNAVAILABLE_MESSAGES = ("database is locked", "unable to open database file")
# A statement cancelled: past its statement_timeout, or by pg_cancel_backend.
_CANCELLED_SQLSTATE = "57014"


def database_complaint(exc: DBAPIError) -> str:
    """The first line of what the database said (at most 200 characters): never the
    statement or its parameters, which SQLAlchemy's message goes on to show."""
    return (str(exc.orig).splitlines() or [""])[0][:200] if exc.orig is not None else ""


def statement_cancelled(exc: BaseException) -> str | None:
    """The database's first line when ``exc`` is a statement it cancelled (its
    ``statement_timeout``, or an operator's ``pg_cancel_backend``), never the statement
    or its parameters; None for any other error. Not an outage: the same request may
    meet the same limit again."""
    if not isinstance(exc, DBAPIError) or exc.orig is None:
        return None
    if str(getattr(exc.orig, "sqlstate", "") or "") != _CANCELLED_SQLSTATE:
        return None
    return database_complaint(exc) or type(exc.orig).__name__


def database_unavailable(exc: BaseException) -> str | None:
    """A short reason when ``exc`` says the database is unreachable or refusing work
    for now (a retry later may succeed: 503), never the statement or its parameters;
    None for any other error."""
    if isinstance(exc, SqlAlchemyTimeout):
        return "no database connection was free in time"
    if isinstance(exc, ConnectionError):  # a connection dropped under the driver
        return type(exc).__name__
    if not isinstance(exc, DBAPIError):
        return None
    first = database_complaint(exc)
    sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
    if (
        exc.connection_invalidated
        or isinstance(exc.orig, (OSError, ConnectionError))
        or sqlstate.startswith("08")
        or sqlstate in _UNAVAILABLE_SQLSTATES
        or type(exc.orig).__name__ in _LOST_CONNECTION_ERRORS
        or first.startswith(_SQLITE_UNAVAILABLE_MESSAGES)
    ):
        return first or type(exc.orig).__name__
    return None


# asyncpg's errors for a connection that closed under a statement (they carry no state).
_LOST_CONNECTION_ERRORS = frozenset({"ConnectionDoesNotExistError"})
