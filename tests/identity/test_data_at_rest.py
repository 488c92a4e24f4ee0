"""A raw dump of the database shows no email address and no phone number in clear, in
any spelling, after every identity flow has run; nor any password, token, authenticator
secret, recovery code or API key.

On SQLite the dump is the database file and its write-ahead log, byte for byte (what a
stolen disk or backup holds); on PostgreSQL it is `pg_dump`'s output."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from soko.platform.runtime import Runtime
from tests.identity.privacy_support import Exposure, walk_every_flow

PG_DUMP = shutil.which("pg_dump") or "/usr/bin/pg_dump"


async def _raw_dump(database_url: str) -> bytes:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        database = Path(url.database)
        files = [database, database.with_name(database.name + "-wal")]
        dump = b"".join(path.read_bytes() for path in files if path.exists())
        assert dump, "the database file is missing"
        return dump
    process = await asyncio.create_subprocess_exec(
        PG_DUMP,
        "--host",
        url.host or "127.0.0.1",
        "--port",
        str(url.port or 5432),
        "--username",
        url.username or "postgres",
        "--no-password",
        "--dbname",
        str(url.database),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")
    return out


def _found_in(dump: bytes, values: list[str]) -> list[str]:
    text = dump.decode("utf-8", errors="replace").lower()
    return [value for value in values if value.lower() in text]


@pytest.fixture
def pg_dump_available(backend: str) -> None:
    if backend == "postgresql" and not Path(PG_DUMP).exists():
        pytest.fail("pg_dump is needed to dump the PostgreSQL test database")


async def test_a_raw_dump_holds_no_email_or_phone_in_clear(
    app: Any,
    runtime: Runtime,
    database_url: str,
    pg_dump_available: None,
) -> None:
    seen: Exposure = await walk_every_flow(app, runtime)
    dump = await _raw_dump(database_url)

    # The dump holds the data: what is stored in clear by design is there.
    assert _found_in(dump, seen.display_names) == seen.display_names
    assert _found_in(dump, ["Achieng", "Otieno"]) == ["Achieng", "Otieno"]

    personal = seen.personal_data()
    assert len(seen.emails) == 3 and len(seen.phones) == 2
    assert _found_in(dump, personal) == []


async def test_a_raw_dump_holds_no_secret_in_clear(
    app: Any,
    runtime: Runtime,
    database_url: str,
    pg_dump_available: None,
) -> None:
    seen = await walk_every_flow(app, runtime)
    dump = await _raw_dump(database_url)
    secrets = seen.secrets()
    assert len(seen.totp_secrets) == 1 and len(seen.recovery_codes) == 10
    assert len(seen.api_keys) == 1 and len(seen.passwords) == 3
    assert _found_in(dump, secrets) == []
