"""End to end: the newcomer's path (`soko migrate upgrade`, then `soko serve`) on a fresh
data directory, and a graceful stop that lets an in-flight request finish.

Each server is a real subprocess on a free loopback port. Waits are bounded polls; no
assertion is made about how long anything took.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from openapi_spec_validator import validate as validate_openapi

from soko.platform.config import GENERATED_SECRETS_FILE

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening_sockets(port: int) -> int:
    """How many IPv4 sockets listen on ``port`` (Linux's /proc/net/tcp, state 0A)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            count += 1
    return count


def _shared_on_redis(redis_url: str) -> dict[str, str]:
    """The settings that let several processes share the cache, limits and pub/sub."""
    return {
        "SOKO_REDIS_URL": redis_url,
        "SOKO_CACHE_BACKEND": "redis",
        "SOKO_RATELIMIT_BACKEND": "redis",
        "SOKO_PUBSUB_BACKEND": "redis",
    }


def _environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOKO_")}
    # The working directory is a scratch one (no .env); tests/ must still import.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["SOKO_DATA_DIR"] = str(data_dir)
    env["SOKO_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


class Server:
    """One `soko serve` subprocess, its port and its output."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, port: int) -> None:
        self.port = port
        self.log = cwd / f"server-{port}.log"
        self._log_handle = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, *args, "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        self._log_handle.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_until_healthy(self) -> None:
        def healthy() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                return httpx2.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx2.TransportError:
                return False

        _wait_for(healthy, START_TIMEOUT, f"/health on {self.url}")

    def accepts_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        self._log_handle.close()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A scratch working directory and a data directory that does not exist yet."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    yield workdir, tmp_path / "data"


def _migrate(env: dict[str, str], cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "soko", "migrate", "upgrade"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_newcomer_migrates_serves_and_stops(fresh: tuple[Path, Path]) -> None:
    workdir, data_dir = fresh
    env = _environment(data_dir)
    _migrate(env, workdir)
    assert (data_dir / "soko.db").exists()

    server = Server(["-m", "soko", "serve"], env, workdir, _free_port())
    try:
        server.wait_until_healthy()
        with httpx2.Client(base_url=server.url, timeout=10) as client:
            health = client.get("/health")
            assert health.json() == {"status": "ok"}
            assert health.headers["x-request-id"]

            ready = client.get("/ready")
            assert ready.status_code == 200, ready.text
            checks = ready.json()["checks"]
            assert checks["database"]["status"] == "up"
            assert checks["database"]["backend"] == "sqlite"

            spec_response = client.get("/api/v1/openapi.json")
            assert spec_response.status_code == 200
            spec: dict[str, Any] = json.loads(spec_response.text)
            assert spec["openapi"].startswith("3.")
            validate_openapi(spec)
            assert spec["info"]["title"] == "Soko"

            missing = client.get("/no/such/stall", headers={"X-Request-ID": "e2e-trace-1"})
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/problem+json"
            assert missing.headers["x-request-id"] == "e2e-trace-1"
            problem = missing.json()
            assert problem["status"] == 404
            assert problem["type"] == "/problems/not-found"

            # The served app hashes passwords in worker processes (the default pool),
            # started with it; its own shutdown below stops them.
            workers = _hash_workers(server.process.pid)
            assert len(workers) == 1, workers
            account = {"email": "wanjiru@example.com", "password": "mvua ya masika 2031"}
            registered = client.post("/api/v1/auth/register", json=account)
            assert registered.status_code == 201, registered.text
            credentials = {"identifier": account["email"], "password": account["password"]}
            signed_in = client.post("/api/v1/auth/login", json=credentials)
            assert signed_in.status_code == 200, signed_in.text
            token = signed_in.json()["access_token"]
            wrong = client.post("/api/v1/auth/login", json={**credentials, "password": "x" * 12})
            assert wrong.status_code == 401, wrong.text
            me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
            assert me.json()["email"] == account["email"]

        secrets_file = data_dir / GENERATED_SECRETS_FILE
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600

        assert _hash_workers(server.process.pid) == workers  # the same one did the work
        assert server.stop() == 0, server.output()
        assert not server.accepts_connections()
        # They end with the server: none is left behind.
        _wait_for(lambda: not any(_alive(pid) for pid in workers), STOP_TIMEOUT, "workers")
    finally:
        server.close()


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); none
    for a process that is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def _hash_workers(root: int) -> list[int]:
    """The password hashing worker processes of ``root`` or of its children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"soko.identity.hashing" in command:
            parent = _parent(int(entry.name))
            if root in (parent, _parent(parent)):
                found.append(int(entry.name))
    return found


def test_sigterm_drains_the_request_in_flight(fresh: tuple[Path, Path]) -> None:
    """SIGTERM while a request is in flight: the listener closes at once, the request
    still finishes with 200, and the process then exits 0."""
    workdir, data_dir = fresh
    slow_dir = workdir / "slow"
    slow_dir.mkdir()
    env = _environment(data_dir, SOKO_TEST_SLOW_DIR=str(slow_dir), SOKO_SHUTDOWN_GRACE_SECONDS="45")
    _migrate(env, workdir)

    # Through soko's own serve path, with the test factory in place of the real one.
    server = Server(["-m", "tests.platform.serve_app", "serve"], env, workdir, _free_port())
    outcome: dict[str, Any] = {}

    def send_slow_request() -> None:
        try:
            outcome["response"] = httpx2.get(f"{server.url}/test/slow", timeout=STOP_TIMEOUT)
        except Exception as exc:
            outcome["error"] = exc

    request = threading.Thread(target=send_slow_request)
    try:
        server.wait_until_healthy()
        # Startup froze what it loaded: full collections no longer walk the whole app.
        assert httpx2.get(f"{server.url}/test/gc").json()["frozen"] > 50_000
        request.start()
        _wait_for((slow_dir / "started").exists, STOP_TIMEOUT, "the slow request to start")

        server.process.send_signal(signal.SIGTERM)
        _wait_for(lambda: not server.accepts_connections(), STOP_TIMEOUT, "the listener to close")
        # Still in flight: the server stopped accepting before the request finished.
        assert request.is_alive()
        assert server.process.poll() is None
        assert outcome == {}

        (slow_dir / "release").touch()
        request.join(timeout=STOP_TIMEOUT)
        assert not request.is_alive()
        assert "error" not in outcome, outcome
        response = outcome["response"]
        assert response.status_code == 200
        assert response.json() == {"finished": True, "released": True}

        assert server.process.wait(timeout=STOP_TIMEOUT) == 0, server.output()
        assert "Waiting for application shutdown" in server.output()
    finally:
        (slow_dir / "release").touch()
        server.close()
        request.join(timeout=STOP_TIMEOUT)


def test_processes_share_new_connections(fresh: tuple[Path, Path], redis_url: str) -> None:
    """With several processes each listens on a socket of its own (SO_REUSEPORT), so
    connections opened at once spread across them instead of piling onto whichever
    process accepted first. Sixteen connections all landing on one of two sockets by the
    kernel's hash would happen about once in 30,000 runs."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel spreads connections across sockets on Linux")
    workdir, data_dir = fresh
    env = _environment(
        data_dir,
        **_shared_on_redis(redis_url),
    )
    _migrate(env, workdir)
    server = Server(
        ["-m", "tests.platform.serve_app", "serve", "--workers", "2"], env, workdir, _free_port()
    )
    clients = [httpx2.Client(base_url=server.url, timeout=10) for _ in range(16)]
    try:
        server.wait_until_healthy()

        def both_started() -> bool:
            return server.output().count("Application startup complete") >= 2

        _wait_for(both_started, START_TIMEOUT, "both processes to start")
        # Each client holds one keep-alive connection; ask twice on each, back to back
        # (a connection left idle past uvicorn's keep-alive of 5 s, on a slow machine,
        # would be closed and opened anew, maybe to the other process).
        pairs = [
            (client.get("/test/pid").json()["pid"], client.get("/test/pid").json()["pid"])
            for client in clients
        ]
        assert all(first == second for first, second in pairs), (
            f"a keep-alive connection changed process: {pairs}"
        )
        answered = [first for first, _second in pairs]
        assert len(set(answered)) == 2, answered
        # Two listening sockets on the port, one a process: the kernel chooses between
        # them for each new connection (one shared socket would be listed once).
        assert _listening_sockets(server.port) == 2
        assert "with a socket per worker" in server.output()

        assert server.stop() == 0, server.output()
        assert not server.accepts_connections()
    finally:
        for client in clients:
            client.close()
        server.close()


def test_worker_stops_cleanly_on_sigterm(fresh: tuple[Path, Path], redis_url: str) -> None:
    """`soko worker` (shared concerns on Redis, as it requires) polls the outbox until
    SIGTERM, then stops claiming, releases what it holds and exits 0."""
    workdir, data_dir = fresh
    env = _environment(
        data_dir,
        **_shared_on_redis(redis_url),
        SOKO_OUTBOX_DISPATCH="worker",
        SOKO_OUTBOX_POLL_SECONDS="0.1",
        # The claim statement in the log tells the test the worker is polling.
        SOKO_DATABASE_ECHO="true",
    )
    _migrate(env, workdir)
    log = workdir / "worker.log"
    with log.open("wb") as handle:
        worker = subprocess.Popen(
            [sys.executable, "-m", "soko", "worker"],
            cwd=workdir,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        try:

            def polling() -> bool:
                if worker.poll() is not None:
                    pytest.fail(f"the worker exited early:\n{log.read_text(errors='replace')}")
                return "UPDATE outbox_messages" in log.read_text(errors="replace")

            _wait_for(polling, START_TIMEOUT, "the worker to poll the outbox")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=STOP_TIMEOUT) == 0, log.read_text(errors="replace")
            assert "worker stopping" in log.read_text(errors="replace")
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=STOP_TIMEOUT)


def test_worker_once_exits_when_the_outbox_is_drained(
    fresh: tuple[Path, Path], redis_url: str
) -> None:
    workdir, data_dir = fresh
    env = _environment(
        data_dir,
        **_shared_on_redis(redis_url),
        SOKO_OUTBOX_DISPATCH="worker",
    )
    _migrate(env, workdir)
    result = subprocess.run(
        [sys.executable, "-m", "soko", "worker", "--once"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
