"""The declared encrypted columns: every ciphertext column of every domain is declared
(key rotation re-encrypts only those), and `soko keys` sees them all in a process of its
own."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from soko.platform.db import Base
from soko.platform.encrypted import encrypted_column, encrypted_columns

# Load-bearing: the columns of the other domains besides identity's.
OTHER_DOMAINS_COLUMNS = {
    "sellers.payout_details",
    "webhooks_endpoints.secret_ciphertext",
    "webhooks_endpoints.previous_secret_ciphertext",
}


def test_every_ciphertext_column_of_the_metadata_is_declared() -> None:
    declared = {
        (column.entity.__table__.name, column.value.property.columns[0].name): column.name
        for column in encrypted_columns()
    }
    stored = {
        (table.name, column.name)
        for table in Base.metadata.tables.values()
        for column in table.columns
        if column.name.endswith("_ciphertext")
    }
    assert stored == set(declared), "a *_ciphertext column is not declared in its models module"
    assert set(declared.values()) >= OTHER_DOMAINS_COLUMNS
    for column in encrypted_columns():
        assert isinstance(column.value.property.columns[0].type, Text), column.name
    names = [column.name for column in encrypted_columns()]
    assert names == sorted(names)


class _ScratchBase(DeclarativeBase):
    """Metadata of this module's own, so the application's stays as it is."""


class _Scratch(_ScratchBase):
    """A table of this test module's own, never created."""

    __tablename__ = "test_encrypted_columns_scratch"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    first_ciphertext: Mapped[str] = mapped_column(Text)
    second_ciphertext: Mapped[str] = mapped_column(Text)


def test_a_declaration_is_checked() -> None:
    from soko.identity.models import User

    name = "test_encrypted_columns_scratch.first"
    try:
        assert encrypted_column(name, _Scratch.id, _Scratch.first_ciphertext) == name
        # Declared again by the same module (imported twice): harmless.
        assert encrypted_column(name, _Scratch.id, _Scratch.first_ciphertext) == name
        with pytest.raises(ValueError, match="declared twice"):
            encrypted_column(name, _Scratch.id, _Scratch.second_ciphertext)
        with pytest.raises(ValueError, match="different tables"):
            encrypted_column("test_encrypted_columns_scratch.x", User.id, _Scratch.first_ciphertext)
    finally:
        from soko.platform import encrypted

        encrypted._COLUMNS.pop(name, None)
    assert name not in {column.name for column in encrypted_columns()}


_KEYS_STATUS = """
from soko.cli import app
from soko.platform.encrypted import encrypted_columns

try:
    app(["keys", "status"], prog_name="soko")
except SystemExit as exit:
    print("exit", exit.code)
print("columns", ",".join(column.name for column in encrypted_columns()))
"""


@pytest.mark.slow
def test_soko_keys_declares_every_domains_columns_in_a_process_of_its_own(
    tmp_path: Path,
) -> None:
    """`soko keys status` and `soko keys rotate --wait` run in a process that serves no
    app: the command itself must load every domain's models, or it would walk
    identity's columns only and call the rotation done."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOKO_")}
    env["SOKO_DATA_DIR"] = str(tmp_path / "data")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    migrated = run("-m", "soko", "migrate", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    status = run("-c", _KEYS_STATUS)
    assert status.returncode == 0, status.stderr
    assert "exit 0" in status.stdout, status.stdout + status.stderr
    assert "no encrypted value is stored yet" in status.stdout
    columns = status.stdout.rsplit("columns ", 1)[1].split()[0].split(",")
    assert set(columns) >= OTHER_DOMAINS_COLUMNS
