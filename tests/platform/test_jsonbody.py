"""The hot-path JSON writer answers what pydantic-core would, byte for byte."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

import pytest
from pydantic_core import to_json

from soko.platform import jsonbody


class _UuidSubclass(uuid.UUID):
    """Stands in for asyncpg's UUID, a subclass that orjson does not know."""


_ID = uuid.UUID("01a247c5-b780-72d9-8689-0123456789ab")

SAME_AS_PYDANTIC: list[Any] = [
    {"items": [], "next_cursor": None},
    [True, False, None, 0, -1, 2**63 - 1, -(2**63), "", "plain"],
    ['é</script>\u2028\x01"\\', "\U0001f600", "tab\there"],
    [1.5, 0.1, 1e16, -0.0, 123456.789],
    [_ID, _UuidSubclass(int=_ID.int)],
    {
        "aware": dt.datetime(2026, 12, 5, 19, 53, 1, 123456, tzinfo=dt.UTC),
        "whole_second": dt.datetime(2026, 12, 5, 19, 53, tzinfo=dt.UTC),
        "offset": dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=3))),
        "naive": dt.datetime(2026, 1, 1, 8, 30),
        "date": dt.date(2026, 12, 5),
    },
    {"nested": {"deeper": [{"id": _UuidSubclass(int=1)}, {"k": [1, [2, [3]]]}]}},
]


@pytest.mark.parametrize("value", SAME_AS_PYDANTIC)
def test_writes_the_bytes_pydantic_core_writes(value: Any) -> None:
    assert jsonbody.dumps(value) == to_json(value)


@pytest.mark.parametrize(
    "value",
    [2**64, -(2**70), decimal.Decimal("12.50"), {1: "non-string key"}, [{"big": 10**30}]],
)
def test_what_orjson_refuses_is_written_by_pydantic_core(value: Any) -> None:
    assert jsonbody.dumps(value) == to_json(value)


def test_an_unserializable_value_is_still_an_error() -> None:
    with pytest.raises(Exception, match="serializ"):
        jsonbody.dumps({"x": object()})


@pytest.mark.parametrize(
    "document",
    [
        '{"size": "XL", "colours": ["red", "blue"], "n": 3, "x": 1.5, "ok": true, "none": null}',
        "[]",
        '"caf\\u00e9 \\ud83d\\ude00"',
        '{"a": 1, "a": 2}',  # the last one wins, as in json.loads
        "18446744073709551616",  # beyond 64 bits: orjson would read a float
        '{"n": -9223372036854775809, "m": [123456789012345678901234567890]}',
        '{"phone": "+2547000000000000000000"}',  # long digits in a string read the same
        '{"weight": NaN, "max": Infinity}',  # json.loads reads these, orjson does not
        '"\\ud800"',  # a lone surrogate
        "1e400",
    ],
)
def test_reads_json_as_the_standard_library_does(document: str) -> None:
    expected = json.loads(document)
    read = jsonbody.loads(document)
    assert repr(read) == repr(expected)
    assert jsonbody.loads(document.encode("utf-8", "surrogatepass")) is not None or expected is None


def test_a_malformed_document_is_still_an_error() -> None:
    with pytest.raises(ValueError):
        jsonbody.loads('{"open": ')


async def test_the_database_reads_json_columns_through_it(runtime: Any) -> None:
    from sqlalchemy import JSON, column, text

    cast = "CAST('{\"n\": 18446744073709551616}' AS json)"
    async with runtime.db.engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            cast = "'{\"n\": 18446744073709551616}'"
        statement = text(f"SELECT {cast} AS v").columns(column("v", JSON))
        value = (await connection.execute(statement)).scalar()
    assert value == {"n": 18446744073709551616}
    assert runtime.db.engine.dialect._json_deserializer is jsonbody.loads
