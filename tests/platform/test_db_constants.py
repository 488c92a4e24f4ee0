"""sql_constant writes a value into the SQL as a quoted literal, never as a parameter."""

from __future__ import annotations

from sqlalchemy import Column, MetaData, String, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from soko.platform.db import sql_constant

_ITEMS = Table("items", MetaData(), Column("status", String))


def test_a_constant_is_written_into_the_sql_with_its_quotes_doubled() -> None:
    statement = select(_ITEMS.c.status).where(_ITEMS.c.status == sql_constant("o'clock"))
    for dialect in (postgresql.dialect(), sqlite.dialect()):
        compiled = statement.compile(dialect=dialect)
        assert "items.status = 'o''clock'" in str(compiled)
        assert compiled.params == {}
