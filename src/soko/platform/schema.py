"""Whether the database's schema is the one this build was written for.

``soko migrate upgrade`` records the migration a database is at in Alembic's
``alembic_version`` table. A process started on a database that was never migrated, or
one a release behind, would answer every request with a 500; this module tells it so at
start (a log line naming the command to run) and through ``/ready`` (503), so a load
balancer never sends it traffic.

A database *ahead* of the build (its migrations applied before this process was
replaced, as a rolling deploy does) is ready: Soko's migrations add before they take
away, so the previous release keeps working on the newer schema.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

import soko


def migrations_location() -> Path:
    """The migration scripts: inside the installed package, or beside the source tree."""
    packaged = Path(soko.__file__).parent / "migrations"
    source_tree = Path(soko.__file__).resolve().parents[2] / "migrations"
    return packaged if packaged.is_dir() else source_tree


@dataclass(frozen=True)
class Revisions:
    head: str
    known: frozenset[str]


@cache
def revisions() -> Revisions:
    """This build's newest migration and every one before it, read once per process."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(migrations_location()))
    heads = scripts.get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads; merge them into one")
    return Revisions(heads[0], frozenset(script.revision for script in scripts.walk_revisions()))


class SchemaStatus(enum.StrEnum):
    current = "current"  # at this build's newest migration
    ahead = "ahead"  # at a newer migration than this build knows: a rolling deploy
    behind = "behind"  # at an older migration: run soko migrate upgrade
    unmigrated = "unmigrated"  # no migration recorded at all


@dataclass(frozen=True)
class SchemaState:
    status: SchemaStatus
    revision: str | None
    expected: str

    @property
    def serves(self) -> bool:
        """Whether this build can answer requests on the database."""
        return self.status in (SchemaStatus.current, SchemaStatus.ahead)

    def advice(self) -> str:
        if self.status is SchemaStatus.unmigrated:
            return "the database has no schema yet: run `soko migrate upgrade`"
        if self.status is SchemaStatus.behind:
            return (
                f"the database schema is at {self.revision}, this build needs "
                f"{self.expected}: run `soko migrate upgrade`"
            )
        if self.status is SchemaStatus.ahead:
            return f"the database schema ({self.revision}) is newer than this build"
        return f"the database schema is at {self.revision}"


async def recorded_revision(engine: AsyncEngine) -> str | None:
    """The migration Alembic's ``alembic_version`` table records; ``None`` without one
    (or without the table)."""
    async with engine.connect() as connection:
        try:
            result = await connection.execute(text("SELECT version_num FROM alembic_version"))
        except DBAPIError:
            return None  # no such table: never migrated
        rows = result.scalars().all()
    return str(rows[0]) if len(rows) == 1 else None


async def schema_state(engine: AsyncEngine) -> SchemaState:
    """Where the database's schema stands against this build's."""
    expected = revisions()
    revision = await recorded_revision(engine)
    if revision is None:
        status = SchemaStatus.unmigrated
    elif revision == expected.head:
        status = SchemaStatus.current
    elif revision in expected.known:
        status = SchemaStatus.behind
    else:
        status = SchemaStatus.ahead
    return SchemaState(status, revision, expected.head)


def stamp_current(connection: Connection) -> None:
    """Record this build's newest migration as the one ``connection``'s database is at,
    as ``alembic stamp head`` does. For a schema made straight from the models (tests,
    benchmarks), which is what the migrations make; run it through ``run_sync``."""
    connection.execute(
        text(
            "CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL, "
            "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
        )
    )
    connection.execute(text("DELETE FROM alembic_version"))
    connection.execute(
        text("INSERT INTO alembic_version (version_num) VALUES (:revision)"),
        {"revision": revisions().head},
    )


def create_current_schema(connection: Connection) -> None:
    """Every table of the loaded models, recorded as this build's newest migration."""
    from soko.platform.db import Base

    Base.metadata.create_all(connection)
    stamp_current(connection)


def models_filter(dialect: str) -> Callable[..., bool]:
    """Alembic's ``include_object`` for comparing a ``dialect`` database with the models:
    an index the models create only on other databases (``Index.ddl_if``) is left out,
    as ``create_all`` leaves it out, instead of reported missing."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        condition = getattr(obj, "_ddl_if", None) if type_ == "index" and not reflected else None
        if condition is None or condition.dialect is None:
            return True
        named = condition.dialect
        return dialect == named if isinstance(named, str) else dialect in named

    return include
