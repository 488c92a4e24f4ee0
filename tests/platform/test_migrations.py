"""The Alembic history agrees with the models, on SQLite and PostgreSQL.

Each test migrates a database of its own (a file on SQLite, a scratch database on
PostgreSQL) with the same Alembic configuration `soko migrate` builds, then compares the
result with ``Base.metadata`` the way ``alembic revision --autogenerate`` would. A model
change without its migration, or a migration without its model, fails here.

The tests are synchronous on purpose: migrations/env.py runs its own event loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Index, Integer, MetaData, String, Table, inspect, text
from sqlalchemy.engine import Connection

from soko.app import load_models
from soko.cli import _alembic_config
from soko.platform.db import Base, create_engine
from soko.platform.schema import models_filter
from tests.conftest import POSTGRES_UP, POSTGRES_URL, _unavailable, make_settings

load_models()


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _admin(statement: str) -> None:
    engine = create_engine(POSTGRES_URL)
    try:
        async with engine.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
def empty_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it, of its own, on the parametrized backend."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{(tmp_path / 'migrated.db').as_posix()}"
        return
    if not POSTGRES_UP:
        _unavailable("PostgreSQL")
    name = f"soko_migrations_{uuid.uuid4().hex[:16]}"
    _run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        base, _, _ = POSTGRES_URL.rpartition("/")
        yield f"{base}/{name}"
    finally:
        _run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _config(tmp_path: Path, url: str) -> Config:
    config = _alembic_config(make_settings(tmp_path, database_url=url))
    assert isinstance(config, Config)
    return config


def _heads(config: Config) -> list[str]:
    return list(ScriptDirectory.from_config(config).get_heads())


def _inspect(url: str, look: Any) -> Any:
    async def go() -> Any:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(look)
        finally:
            await engine.dispose()

    return _run(go())


def _table_names(url: str) -> set[str]:
    return set(_inspect(url, lambda conn: inspect(conn).get_table_names()))


def _current_revisions(url: str) -> set[str]:
    def look(conn: Connection) -> set[str]:
        return set(MigrationContext.configure(conn).get_current_heads())

    return set(_inspect(url, look))


def _differences(url: str, metadata: MetaData) -> list[Any]:
    """What autogenerate would write to turn the database into ``metadata``."""

    def look(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn,
            # The same comparison migrations/env.py asks autogenerate for.
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_object": models_filter(conn.dialect.name),
            },
        )
        return list(compare_metadata(context, metadata))

    return list(_inspect(url, look))


def _model_tables() -> set[str]:
    return set(Base.metadata.tables)


def test_history_has_one_head(tmp_path: Path) -> None:
    heads = _heads(_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"))
    # Two heads mean two branches nobody merged: `upgrade head` would refuse to run.
    assert len(heads) <= 1, f"the migration history has several heads: {heads}"
    if _model_tables():
        assert len(heads) == 1, "the models declare tables but there is no migration"


def test_upgrade_head_matches_the_models(tmp_path: Path, empty_database: str) -> None:
    config = _config(tmp_path, empty_database)
    command.upgrade(config, "head")

    assert _differences(empty_database, Base.metadata) == []
    assert _table_names(empty_database) - {"alembic_version"} == _model_tables()
    assert _current_revisions(empty_database) == set(_heads(config))


def _copy_of_models() -> MetaData:
    copy = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(copy)
    return copy


def _named(differences: list[Any], kind: str) -> list[str]:
    """Names of the tables (or columns) in the differences of ``kind``."""
    position = 3 if kind.endswith("_column") else 1
    return [d[position].name for d in differences if isinstance(d, tuple) and d[0] == kind]


def test_the_comparison_sees_drift(tmp_path: Path, empty_database: str) -> None:
    """The comparison above is not vacuous: a table the migrations lack is reported, and
    so is a migrated table the models no longer declare."""
    command.upgrade(_config(tmp_path, empty_database), "head")

    drifted = _copy_of_models()
    Table(
        "stall_sign",
        drifted,
        Column("id", Integer, primary_key=True),
        Column("wording", String(80), nullable=False),
    )
    assert "stall_sign" not in _named(_differences(empty_database, Base.metadata), "add_table")
    assert "stall_sign" in _named(_differences(empty_database, drifted), "add_table")

    migrated = sorted(_table_names(empty_database) & _model_tables())
    if migrated:
        drifted.remove(drifted.tables[migrated[0]])
        assert migrated[0] in _named(_differences(empty_database, drifted), "remove_table")


def test_the_comparison_sees_a_changed_column(tmp_path: Path, empty_database: str) -> None:
    command.upgrade(_config(tmp_path, empty_database), "head")
    migrated = sorted(_table_names(empty_database) & _model_tables())
    if not migrated:
        pytest.skip("no table is migrated yet")
    drifted = _copy_of_models()
    drifted.tables[migrated[0]].append_column(Column("stall_number", Integer, nullable=True))
    assert "stall_number" not in _named(_differences(empty_database, Base.metadata), "add_column")
    assert "stall_number" in _named(_differences(empty_database, drifted), "add_column")


def test_an_index_of_one_database_is_compared_there_only(
    tmp_path: Path, empty_database: str
) -> None:
    """The products' trigram index exists on PostgreSQL only (``ddl_if``): elsewhere the
    comparison leaves it out, on PostgreSQL it still reports it missing."""
    command.upgrade(_config(tmp_path, empty_database), "head")
    index = "ix_catalog_products_search"

    def drop(conn: Connection) -> str:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"DROP INDEX {index}"))
            conn.commit()
        return conn.dialect.name

    dialect = _inspect(empty_database, drop)
    missing = [
        d[1].name for d in _differences(empty_database, Base.metadata) if d[0] == "add_index"
    ]
    assert missing == ([index] if dialect == "postgresql" else [])


def test_downgrade_to_base_and_upgrade_again(tmp_path: Path, empty_database: str) -> None:
    config = _config(tmp_path, empty_database)
    command.upgrade(config, "head")
    command.downgrade(config, "base")

    assert _table_names(empty_database) <= {"alembic_version"}
    assert _current_revisions(empty_database) == set()

    command.upgrade(config, "head")
    assert _differences(empty_database, Base.metadata) == []
    assert _current_revisions(empty_database) == set(_heads(config))


def test_each_step_reverts_cleanly(tmp_path: Path, empty_database: str) -> None:
    """Walk the history one revision at a time, down and up again, so a downgrade that
    only works from head (or leaves something behind) is caught."""
    config = _config(tmp_path, empty_database)
    script = ScriptDirectory.from_config(config)
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    for revision in revisions:
        command.upgrade(config, revision)
        tables_after_upgrade = _table_names(empty_database)
        command.downgrade(config, "-1")
        command.upgrade(config, revision)
        assert _table_names(empty_database) == tables_after_upgrade
        assert _current_revisions(empty_database) == {revision}
    assert _differences(empty_database, Base.metadata) == []


def test_the_filter_keeps_an_index_where_it_is_made() -> None:
    metadata = MetaData()
    table = Table("stall", metadata, Column("id", Integer, primary_key=True), Column("x", Integer))
    everywhere = Index("ix_everywhere", table.c.x)
    one = Index("ix_one", table.c.x).ddl_if(dialect="postgresql")
    several = Index("ix_several", table.c.x).ddl_if(dialect=("postgresql", "mysql"))

    def kept(index: Index, dialect: str, *, reflected: bool = False) -> bool:
        return models_filter(dialect)(index, index.name, "index", reflected, None)

    assert kept(everywhere, "sqlite") and kept(everywhere, "postgresql")
    assert kept(one, "postgresql") and not kept(one, "sqlite")
    assert kept(several, "mysql") and not kept(several, "sqlite")
    assert kept(one, "sqlite", reflected=True)  # what the database has is always compared
    assert models_filter("sqlite")(table, "stall", "table", False, None)
