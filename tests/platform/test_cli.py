"""The `soko` command line: help, version, check-config, serve's refusals, migrate."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from alembic.config import Config
from alembic.script import ScriptDirectory
from typer.testing import CliRunner

import soko
from soko.cli import _alembic_config, app
from soko.platform import serving
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run each command in an empty directory (no .env) with no inherited SOKO_*."""
    for name in list(os.environ):
        if name.startswith("SOKO_"):
            monkeypatch.delenv(name)
    directory = tmp_path / "cwd"
    directory.mkdir()
    monkeypatch.chdir(directory)
    monkeypatch.setenv("SOKO_DATA_DIR", str(tmp_path / "data"))
    return directory


def _soko(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m soko`` as a newcomer's shell would."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SOKO_")}
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "soko", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_lists_every_command(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    for command in ("serve", "worker", "migrate", "check-config", "version", "audit"):
        assert command in result.output


def test_migrate_help_lists_its_commands(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["migrate", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    for command in ("upgrade", "downgrade", "current", "revision"):
        assert command in result.output


def test_version_in_process(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"soko {soko.__version__}"


@pytest.mark.slow
def test_python_dash_m_soko_version(workdir: Path) -> None:
    result = _soko("version", env={}, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"soko {soko.__version__}"


def test_check_config_accepts_good_values(workdir: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["check-config"],
        env={"SOKO_PORT": "8100", "SOKO_CORS_ORIGINS": "https://shop.example.com"},
    )
    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.stdout
    assert "sqlite+aiosqlite" in result.stdout


def test_check_config_hides_the_database_password(workdir: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["check-config"],
        env={"SOKO_DATABASE_URL": "postgresql://soko:sup3r-s3cret@db.internal/soko"},
    )
    assert result.exit_code == 0, result.output
    assert "sup3r-s3cret" not in result.output
    assert "db.internal" in result.stdout


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SOKO_WORKERS": "3"}, "SOKO_WORKERS=3"),
        ({"SOKO_OUTBOX_DISPATCH": "worker"}, "SOKO_OUTBOX_DISPATCH=worker"),
    ],
)
def test_check_config_refuses_several_processes_in_memory_as_serve_does(
    workdir: Path, env: dict[str, str], named: str
) -> None:
    # What `soko serve` and `soko worker` refuse, check-config refuses too.
    result = CliRunner().invoke(app, ["check-config"], env=env)
    assert result.exit_code == 2, result.output
    assert "invalid configuration:" in result.stderr
    assert named in result.stderr
    assert "configuration is valid" not in result.stdout


def test_check_config_shows_the_public_url_it_derives(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["check-config"], env={"SOKO_PORT": "8123"})
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8123" in result.stdout


def test_check_config_refuses_a_signing_keys_file_it_cannot_read(workdir: Path) -> None:
    missing = workdir / "nowhere" / "keys.pem"
    result = CliRunner().invoke(
        app, ["check-config"], env={"SOKO_TOKEN_SIGNING_KEYS_FILE": str(missing)}
    )
    assert result.exit_code == 2, result.output
    assert "SOKO_TOKEN_SIGNING_KEYS_FILE: cannot be read" in result.output
    garbage = workdir / "keys.pem"
    garbage.write_text("not a key\n")
    result = CliRunner().invoke(
        app, ["check-config"], env={"SOKO_TOKEN_SIGNING_KEYS_FILE": str(garbage)}
    )
    assert result.exit_code == 2, result.output
    assert "is not a PEM bundle" in result.output


def test_check_config_refuses_bad_values_one_line_each(workdir: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["check-config"],
        env={"SOKO_PORT": "eighty", "SOKO_LOG_LEVEL": "LOUD", "SOKO_RATELIMIT_DEFAULT": "lots"},
    )
    assert result.exit_code == 2
    problem_lines = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problem_lines) == 3, result.stderr
    assert {line.split(":", 1)[0].removeprefix("  - ") for line in problem_lines} == {
        "SOKO_PORT",
        "SOKO_LOG_LEVEL",
        "SOKO_RATELIMIT_DEFAULT",
    }
    assert "configuration is valid" not in result.stdout


def test_check_config_refuses_production_defaults(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["check-config"], env={"SOKO_ENV": "production"})
    assert result.exit_code == 2
    assert "SOKO_SECRET_KEY" in result.stderr
    assert "SOKO_DATABASE_URL" in result.stderr


@pytest.mark.slow
def test_problem_lines_are_not_wrapped_in_a_pipe(workdir: Path) -> None:
    """Each problem stays on one line when stderr is a pipe or a log file, however long."""
    long_url = "mysql://" + "stall" * 30 + ".example.com/soko"
    result = _soko("check-config", env={"SOKO_DATABASE_URL": long_url}, cwd=workdir)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "SOKO_DATABASE_URL" in line]
    assert len(lines) == 1
    assert long_url in lines[0]


def test_serve_refuses_several_processes_with_memory_backends(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--workers", "2"])
    assert result.exit_code == 2
    assert "refusing to start" in result.stderr
    assert "SOKO_WORKERS=2" in result.stderr
    assert "cache, rate limits and pub/sub" in result.stderr
    assert "serving on" not in result.stdout


def test_serve_refuses_worker_dispatch_with_memory_backends(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["serve"], env={"SOKO_OUTBOX_DISPATCH": "worker"})
    assert result.exit_code == 2
    assert "SOKO_OUTBOX_DISPATCH=worker" in result.stderr


def test_serve_refuses_a_bad_configuration(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["serve"], env={"SOKO_PORT": "0"})
    assert result.exit_code == 2
    assert "SOKO_PORT" in result.stderr


def test_serve_runs_uvicorn_with_one_write_a_response(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def run(target: str, **options: Any) -> None:
        seen.update(options, target=target)

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setattr(serving, "socket_per_worker_supported", lambda: False)
    result = CliRunner().invoke(app, ["serve", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert seen["http"] is serving.CoalescingHttpToolsProtocol
    assert seen["port"] == 8123


def test_serve_rejects_a_port_out_of_range(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2
    assert "serving on" not in result.stdout


def test_worker_refuses_memory_backends(workdir: Path) -> None:
    """A worker is always a second process, so in-memory shared concerns are refused."""
    result = CliRunner().invoke(
        app,
        ["worker", "--once"],
        env={
            "SOKO_REDIS_URL": "redis://127.0.0.1:6379/15",
            "SOKO_CACHE_BACKEND": "redis",
            "SOKO_RATELIMIT_BACKEND": "redis",
        },
    )
    assert result.exit_code == 2
    assert "refusing to start" in result.stderr
    assert "pub/sub still live" in result.stderr
    assert "cache," not in result.stderr


def test_worker_refuses_a_bad_configuration(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["worker"], env={"SOKO_OUTBOX_BATCH_SIZE": "0"})
    assert result.exit_code == 2
    assert "SOKO_OUTBOX_BATCH_SIZE" in result.stderr


def _heads(tmp_path: Path) -> list[str]:
    config = _alembic_config(make_settings(tmp_path))
    assert isinstance(config, Config)
    return list(ScriptDirectory.from_config(config).get_heads())


def _tables(database: Path) -> set[str]:
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def _versions(database: Path) -> set[str]:
    if "alembic_version" not in _tables(database):
        return set()
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    return {version for (version,) in rows}


@pytest.mark.slow
def test_migrate_upgrade_current_downgrade(workdir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    env = {"SOKO_DATA_DIR": str(data_dir)}
    heads = _heads(tmp_path)
    database = data_dir / "soko.db"
    runner = CliRunner()

    upgraded = runner.invoke(app, ["migrate", "upgrade"], env=env)
    assert upgraded.exit_code == 0, upgraded.output
    assert "database is at head" in upgraded.stderr
    assert database.exists()
    assert _versions(database) == set(heads)

    # Alembic prints `current` to the process's own stdout: run it as a process.
    current = _soko("migrate", "current", env=env, cwd=workdir)
    assert current.returncode == 0, current.stderr
    for head in heads:
        assert f"{head} (head)" in current.stdout

    again = runner.invoke(app, ["migrate", "upgrade"], env=env)
    assert again.exit_code == 0, again.output
    assert _versions(database) == set(heads)

    downgraded = runner.invoke(app, ["migrate", "downgrade", "base"], env=env)
    assert downgraded.exit_code == 0, downgraded.output
    assert "database is at base" in downgraded.stderr
    assert _tables(database) <= {"alembic_version"}
    assert _versions(database) == set()


@pytest.mark.slow
def test_migrate_with_a_bad_configuration_exits_2(workdir: Path) -> None:
    result = _soko("migrate", "upgrade", env={"SOKO_DATABASE_URL": "mysql://db/x"}, cwd=workdir)
    assert result.returncode == 2
    assert "SOKO_DATABASE_URL" in result.stderr
