"""JSON columns read back exactly as written, on SQLite and PostgreSQL (whose JSON and
JSONB codecs Soko registers itself, handing the driver's bytes to jsonbody.loads), and
``json_text``: a JSON column served as stored, unparsed on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from sqlalchemy import JSON, Column, Integer, MetaData, Table, Text, cast, insert, select, text
from sqlalchemy.dialects import postgresql

from soko.platform import jsonbody
from soko.platform.db import (
    UTCDateTime,
    create_engine,
    json_text,
    unnest_insert,
    unnest_parameters,
)

DOCUMENTS: list[Any] = [
    {"size": "M", "colour": "nyekundu"},
    [{"key": "weight", "value": 1.5}, {"key": "organic", "value": True}],
    {"big": 2**70, "negative": -(2**65), "edge": 2**64 - 1, "small": -(2**63)},
    {"text": 'é</script>\u2028"\\', "emoji": "\U0001f600", "nothing": None},
    [],
    "just a string",
    42,
]


@asynccontextmanager
async def _tables(database_url: str, metadata: MetaData) -> AsyncIterator[Any]:
    """An engine on ``database_url`` with ``metadata``'s tables, dropped after."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        try:
            yield engine
        finally:
            async with engine.begin() as conn:
                await conn.run_sync(metadata.drop_all)
    finally:
        await engine.dispose()


@asynccontextmanager
async def _documents(database_url: str, name: str, column_type: Any) -> AsyncIterator[Any]:
    """A connection and a table ``name`` (``id``, ``doc``) holding DOCUMENTS, dropped after."""
    metadata = MetaData()
    table = Table(
        name, metadata, Column("id", Integer, primary_key=True), Column("doc", column_type)
    )
    async with _tables(database_url, metadata) as engine:
        async with engine.begin() as conn:
            await conn.execute(
                insert(table), [{"id": i, "doc": doc} for i, doc in enumerate(DOCUMENTS)]
            )
        async with engine.connect() as conn:
            yield conn, table


@pytest.mark.parametrize("kind", ["json", "jsonb"])
async def test_documents_read_back_as_written(database_url: str, kind: str) -> None:
    if kind == "jsonb" and not database_url.startswith("postgresql"):
        pytest.skip("JSONB is PostgreSQL's")
    column_type: Any = postgresql.JSONB() if kind == "jsonb" else JSON()
    async with _documents(database_url, f"json_round_trip_{kind}", column_type) as (conn, table):
        rows = (await conn.execute(select(table.c.doc).order_by(table.c.id))).all()
    assert [row[0] for row in rows] == DOCUMENTS
    # Integers beyond 64 bits stay integers, not floats.
    assert isinstance(rows[2][0]["big"], int)


@pytest.mark.postgresql
async def test_postgresql_json_literals_read_by_the_registered_codecs(
    postgres_test_url: str,
) -> None:
    engine = create_engine(postgres_test_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        """SELECT '{"n": 123456789012345678901, "s": "ø"}'::json,
                                  '{"n": 123456789012345678901, "s": "ø"}'::jsonb,
                                  '[1, 2.5, "NaN"]'::jsonb"""
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    assert row[0] == {"n": 123456789012345678901, "s": "ø"}
    assert row[1] == {"n": 123456789012345678901, "s": "ø"}
    assert row[2] == [1, 2.5, "NaN"]


async def test_json_text_passes_documents_through_as_stored(database_url: str) -> None:
    async with _documents(database_url, "json_text_probe", JSON()) as (conn, table):
        served = (await conn.execute(select(json_text(table.c.doc)).order_by(table.c.id))).all()
        stored = (
            (await conn.execute(select(cast(table.c.doc, Text())).order_by(table.c.id)))
            .scalars()
            .all()
        )
    assert served[0]._fields == ("doc",)  # labelled with the column's own name
    for (value,), text_as_stored, document in zip(served, stored, DOCUMENTS, strict=True):
        body = jsonbody.dumps({"value": value})
        assert json.loads(body) == {"value": document}
        if database_url.startswith("postgresql"):
            # Written into the body unparsed: the stored text, spacing and escapes alike.
            assert isinstance(value, orjson.Fragment)
            assert body == b'{"value":' + text_as_stored.encode() + b"}"
        else:
            assert value == document


async def test_json_text_refuses_a_sqlite_column_that_holds_no_json(tmp_path: Any) -> None:
    # SQLite keeps any text in a JSON column; a value that is not JSON must fail the
    # read instead of going into an answer as it is.
    table = Table(
        "json_text_broken",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("doc", JSON()),
    )
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'broken.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.create)
            await conn.execute(text("INSERT INTO json_text_broken (id, doc) VALUES (1, '{oops')"))
        async with engine.connect() as conn:
            with pytest.raises(ValueError):
                (await conn.execute(select(json_text(table.c.doc)))).all()
    finally:
        await engine.dispose()


async def test_unnest_insert_writes_rows_as_a_plain_insert_does(database_url: str) -> None:
    """PostgreSQL: rows written through ``unnest_insert`` (one array a column, JSON as
    text cast back) read back as the same rows written by a plain INSERT: JSON, JSONB
    and SQL NULLs, aware timestamps, text, and no rows at all."""
    if not database_url.startswith("postgresql"):
        pytest.skip("unnest_insert is PostgreSQL's")
    metadata = MetaData()

    def table(name: str) -> Table:
        return Table(
            name,
            metadata,
            Column("id", Integer, primary_key=True),
            Column("doc", JSON),
            Column("docb", JSON().with_variant(postgresql.JSONB(), "postgresql")),
            Column("at", UTCDateTime()),
            Column("note", Text),
        )

    plain, unnested = table("unnest_plain"), table("unnest_probe")
    at = dt.datetime(2026, 12, 6, 15, 30, 1, 250_000, tzinfo=dt.UTC)
    rows: list[dict[str, Any]] = [
        {"id": i, "doc": doc, "docb": doc, "at": at + dt.timedelta(days=i), "note": f"é{i}"}
        for i, doc in enumerate(DOCUMENTS)
    ]
    rows.append({"id": len(rows), "doc": None, "docb": None, "at": None, "note": None})
    async with _tables(database_url, metadata) as engine:
        async with engine.begin() as conn:
            await conn.execute(insert(plain), rows)
            statement = unnest_insert(unnested, "u_")
            await conn.execute(statement, unnest_parameters(unnested, "u_", rows))
            await conn.execute(statement, unnest_parameters(unnested, "u_", []))
        async with engine.connect() as conn:
            read = [
                [tuple(row) for row in await conn.execute(select(t).order_by(t.c.id))]
                for t in (plain, unnested)
            ]
            stored = [
                list(await conn.scalars(text(f"SELECT docb::text FROM {t.name} ORDER BY id")))
                for t in (plain, unnested)
            ]
    assert len(read[1]) == len(rows)
    assert read[1] == read[0]
    assert stored[1] == stored[0]
