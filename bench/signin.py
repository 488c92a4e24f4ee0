"""Sign-in throughput at the configured Argon2id cost, and what a burst of sign-ins does
to the latency of ordinary authenticated reads.

Starts a real ``soko serve`` process on a free loopback port against a fresh database,
creates users, then runs four phases of ``BENCH_SECONDS`` each:

1. ``/me alone``: ``GET /api/v1/me`` at a fixed arrival rate (open loop: latency is
   measured from each request's *scheduled* send time, so a stalled server, or a
   stalled generator, cannot hide queueing);
2. ``/me + sign-ins at R/s``: the same ``/me`` load while password sign-ins arrive at
   ``BENCH_SIGNIN_RATE`` a second, open loop too; prints the p99 of ``/me`` beside its
   value alone;
3. ``/me + N sign-in clients``: the ``/me`` load while ``BENCH_SIGNIN_CLIENTS`` clients
   sign in back to back (closed loop): the most sign-ins the machine holds beside it;
4. ``sign-ins alone``: the sign-in clients without the ``/me`` load.

The ``/me`` client's access token is issued ``BENCH_TRUST_AFTER`` seconds (34) after the
server is ready, as a client's token is in a server that has run a while: past the
leeway and the issuer's delay, the server takes its claims as issued, with no read of
the session's state (ADR 0019). The servers' counters of where each token's state came
from are printed at the end (``PROMETHEUS_MULTIPROC_DIR`` is set for them).

The load comes from two processes of their own (one for ``/me``, one for the sign-ins)
speaking raw HTTP/1.1 over keep-alive connections, so the generator costs little CPU and
never shares an event loop with the other half of the load. Every phase also prints the
CPU time each party used (the server's processes, the generators, the PostgreSQL
backends of the benchmark database, and the whole machine): on a 2-core machine they
all share the same two cores, and the figures say which one ran out.

    python -m bench signin                      # SQLite in a temporary directory
    BENCH_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench \\
        python -m bench signin                  # a PostgreSQL database: a soko_bench* one is
                                                # dropped and created, any other emptied
    BENCH_WORKERS=2 python -m bench signin      # two server processes (Redis backends)

Settings: ``BENCH_SECONDS`` (10), ``BENCH_ME_RATE`` (100 requests/s),
``BENCH_SIGNIN_RATE`` (60 sign-ins/s),
``BENCH_SIGNIN_CLIENTS`` (8), ``BENCH_WORKERS`` (1; more needs Redis:
``BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/14``; its keys are left to expire),
``BENCH_HASH_THREADS`` (the server's ``SOKO_PASSWORD_HASH_THREADS``; default the setting's),
``BENCH_HASH_POOL`` (the server's ``SOKO_PASSWORD_HASH_POOL``, ``process`` or ``thread``;
default the setting's), ``BENCH_TRUST_AFTER`` (34 seconds; 0 issues the token at once,
so each ``/me`` reads its session's state).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import database_name, recreate_database

PASSWORD = "correct horse battery staple 42"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


# -- a minimal HTTP/1.1 keep-alive client ---------------------------------------------------
# httpx costs about a millisecond of CPU per request; on two cores shared with the server
# that is enough to distort what is measured. This speaks just what the benchmark needs.


class HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                raise RuntimeError("chunked responses are not expected here")
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


def _get(path: str, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        "User-Agent: soko-bench\r\n\r\n"
    ).encode()


def _post_json(path: str, payload: dict[str, str]) -> bytes:
    body = json.dumps(payload).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"User-Agent: soko-bench\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _login_request(email: str) -> bytes:
    return _post_json("/api/v1/auth/login", {"identifier": email, "password": PASSWORD})


# -- the generator processes ---------------------------------------------------------------


def _cpu_self() -> float:
    usage = os.times()
    return usage.user + usage.system


async def _open_loop(
    port: int, requests: list[bytes], expect: bytes, rate: float, start: float, seconds: float
) -> dict[str, Any]:
    """Open loop: request i (``requests[i % len(requests)]``) is due at
    ``start + i / rate`` whatever happened before; it takes a free keep-alive connection
    or opens one, and its latency counts from its due time, so waiting for a connection
    (or for this generator) is counted too. An answer is good when it is a 200 whose body
    holds ``expect``.

    Times come from ``time.perf_counter``: uvloop's ``loop.time()`` has millisecond
    steps, too coarse for latencies of a few milliseconds and their ratios."""
    idle: list[HttpConnection] = [await HttpConnection.open(port) for _ in range(8)]
    latencies: list[float] = []
    lateness: list[float] = []
    errors = 0
    first_error: str | None = None
    pending: set[asyncio.Task[None]] = set()

    async def one(due: float, raw: bytes) -> None:
        nonlocal errors, first_error
        lateness.append(time.perf_counter() - due)
        reused = bool(idle)
        connection = idle.pop(0) if idle else await HttpConnection.open(port)
        try:
            try:
                status, body = await connection.request(raw)
            except (OSError, asyncio.IncompleteReadError):
                if not reused:
                    raise
                # The server closed a connection idle past its keep-alive timeout, as
                # HTTP/1.1 allows; a browser would retry on a new one too.
                connection.close()
                connection = await HttpConnection.open(port)
                status, body = await connection.request(raw)
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors += 1
            first_error = first_error or repr(exc)
            connection.close()
        else:
            idle.append(connection)
            if status != 200 or expect not in body:
                errors += 1
                first_error = first_error or f"{status} {body[:200]!r}"
        latencies.append(time.perf_counter() - due)

    await asyncio.sleep(max(0.0, start - time.time()))
    cpu_before = _cpu_self()
    began = time.perf_counter()
    total = int(rate * seconds)
    for index in range(total):
        due = began + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(due, requests[index % len(requests)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    for connection in idle:
        connection.close()
    return {
        "done": len(latencies),
        "latencies": latencies,
        "errors": errors,
        "cpu": _cpu_self() - cpu_before,
        "wall": time.perf_counter() - began,
        "late_p99": _percentile(lateness, 99),
        "first_error": first_error,
    }


async def _signin_load(
    port: int, emails: list[str], clients: int, start: float, seconds: float
) -> dict[str, Any]:
    """Closed loop: each client signs in, then again, until the phase ends."""
    connections = [await HttpConnection.open(port) for _ in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    await asyncio.sleep(max(0.0, start - time.time()))
    cpu_before = _cpu_self()
    began = time.perf_counter()
    deadline = began + seconds

    async def client(offset: int) -> None:
        connection = connections[offset]
        index = offset
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            status, body = await connection.request(_login_request(emails[index % len(emails)]))
            if status != 200 or b"access_token" not in body:
                errors.append(f"{status} {body[:200]!r}")
            latencies.append(time.perf_counter() - sent)
            index += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - began
    for connection in connections:
        connection.close()
    return {
        "done": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "latencies": latencies,
        "cpu": _cpu_self() - cpu_before,
        "wall": wall,
    }


def _generator_main(argv: list[str]) -> None:
    """``python -m bench.signin me|signin <json>``: one generator; prints its result."""
    role, spec = argv[0], json.loads(argv[1])
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if role == "me":
        result = asyncio.run(
            _open_loop(
                spec["port"],
                [_get("/api/v1/me", spec["token"])],
                b"",
                spec["rate"],
                spec["start"],
                spec["seconds"],
            )
        )
    elif spec.get("rate"):
        result = asyncio.run(
            _open_loop(
                spec["port"],
                [_login_request(email) for email in spec["emails"]],
                b"access_token",
                spec["rate"],
                spec["start"],
                spec["seconds"],
            )
        )
    else:
        result = asyncio.run(
            _signin_load(
                spec["port"], spec["emails"], spec["clients"], spec["start"], spec["seconds"]
            )
        )
    sys.stdout.write(json.dumps(result))


# -- CPU accounting ---------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one live process, its threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _database_backends(database: str) -> list[int]:
    """PostgreSQL backends serving ``database`` (their process title names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("postgres:") and f" {database} " in title:
            pids.append(int(entry.name))
    return pids


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS, sum(fields[:8]) / CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU seconds used during one phase by the server, PostgreSQL and the machine.

    Counted per process: one that started during the phase counts from zero, one that
    ended during it counts nothing (its last figures are gone with it), so a pool
    replacing its connections can only make the figures low, never negative."""

    server_pid: int
    database: str | None
    before: dict[str, dict[int, float]] = field(default_factory=dict)
    machine_before: tuple[float, float] = (0.0, 0.0)

    def _sample(self) -> dict[str, dict[int, float]]:
        backends = _database_backends(self.database) if self.database else []
        return {
            "server": {pid: _proc_cpu(pid) for pid in _descendants(self.server_pid)},
            "postgres": {pid: _proc_cpu(pid) for pid in backends},
        }

    def start(self) -> None:
        self.before = self._sample()
        self.machine_before = _machine_cpu()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        busy, total = _machine_cpu()
        used = {
            party: sum(
                max(0.0, cpu - self.before.get(party, {}).get(pid, 0.0))
                for pid, cpu in pids.items()
            )
            for party, pids in after.items()
        }
        used["machine"] = busy - self.machine_before[0]
        used["machine_total"] = total - self.machine_before[1]
        return used


# -- the run ------------------------------------------------------------------------------------


async def create_customers(runtime: Any, emails: list[str], password_hash: str) -> None:
    """Customers with these (verified) emails and one stored password hash, in one
    transaction."""
    from soko.identity.accounts import create_user
    from soko.identity.models import Role

    async with runtime.db.transaction() as session:
        for email in emails:
            await create_user(
                session,
                runtime.data_keys,
                now=runtime.clock.now(),
                email=email,
                password_hash=password_hash,
                roles=(Role.customer,),
                email_verified=True,
            )


async def _prepare(settings: Any, users: int) -> tuple[list[str], list[float]]:
    from soko.app import load_models
    from soko.identity.passwords import password_hasher
    from soko.platform.db import Base, create_engine
    from soko.platform.runtime import Runtime
    from soko.platform.schema import create_current_schema

    load_models()
    engine = create_engine(settings.effective_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(create_current_schema)
    await engine.dispose()
    runtime = Runtime(settings)
    hasher = password_hasher(runtime)
    samples = []
    stored = ""
    for _ in range(30):
        start = time.perf_counter()
        stored = await hasher.hash(PASSWORD)
        samples.append(time.perf_counter() - start)
    emails = [f"bench-{index}@example.com" for index in range(users)]
    await create_customers(runtime, emails, stored)
    hasher.close()
    await runtime.stop()
    return emails, samples


async def _wait_ready(port: int, server: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            connection = await HttpConnection.open(port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            status, _ = await connection.request(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError):
            status = 0
        finally:
            connection.close()
        if status == 200:
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the server did not start")


async def _token(port: int, email: str) -> str:
    connection = await HttpConnection.open(port)
    try:
        status, body = await connection.request(_login_request(email))
    finally:
        connection.close()
    if status != 200:
        raise SystemExit(f"sign-in failed: {status} {body[:200]!r}")
    return str(json.loads(body)["access_token"])


def _spawn(role: str, spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.signin", role, json.dumps(spec)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _collect(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=600)
    if process.returncode != 0:
        raise SystemExit(f"a load generator failed ({process.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass
class Phase:
    name: str
    seconds: float
    me: dict[str, Any] | None
    signin: dict[str, Any] | None
    cpu: dict[str, float]


async def _phase(
    name: str,
    meter: CpuMeter,
    *,
    port: int,
    seconds: float,
    me_rate: float = 0,
    token: str = "",
    clients: int = 0,
    signin_rate: float = 0,
    emails: list[str] | None = None,
) -> Phase:
    start = time.time() + 1.5  # the generators' interpreters start meanwhile
    processes = {}
    if me_rate:
        processes["me"] = _spawn(
            "me",
            {"port": port, "token": token, "rate": me_rate, "start": start, "seconds": seconds},
        )
    if clients or signin_rate:
        processes["signin"] = _spawn(
            "signin",
            {
                "port": port,
                "emails": emails,
                "clients": clients,
                "rate": signin_rate,
                "start": start,
                "seconds": seconds,
            },
        )
    await asyncio.sleep(max(0.0, start - time.time()))
    meter.start()
    results = {}
    for role, process in processes.items():
        results[role] = await asyncio.to_thread(_collect, process)
    cpu = meter.stop()
    return Phase(name, seconds, results.get("me"), results.get("signin"), cpu)


def _report(phase: Phase, *, reference_p99: float | None) -> float | None:
    print(f"-- {phase.name}")
    p99 = None
    if phase.signin is not None:
        done, wall = phase.signin["done"], phase.signin["wall"]
        latency = phase.signin["latencies"]
        loop = (
            "open loop, latency from scheduled send"
            if phase.signin.get("late_p99") is not None
            else "closed loop"
        )
        print(
            f"   sign-ins        {done / wall:.1f}/s ({loop}; {done} in {wall:.1f} s; "
            "latency p50/p99 "
            f"{_percentile(latency, 50) * 1000:.0f} / {_percentile(latency, 99) * 1000:.0f} ms; "
            f"{phase.signin['errors']} errors)"
        )
        if phase.signin["first_error"]:
            print(f"   first error     {phase.signin['first_error']}")
    if phase.me is not None:
        latency = phase.me["latencies"]
        p99 = _percentile(latency, 99) * 1000
        ratio = f"; {p99 / reference_p99:.2f}x alone" if reference_p99 else ""
        print(
            f"   GET /me         p50/p99/max {_percentile(latency, 50) * 1000:.1f} / {p99:.1f} / "
            f"{max(latency) * 1000:.0f} ms at {len(latency) / phase.me['wall']:.0f}/s "
            f"({phase.me['errors']} errors; generator late p99 "
            f"{phase.me['late_p99'] * 1000:.1f} ms{ratio})"
        )
        if phase.me["first_error"]:
            print(f"   first error     {phase.me['first_error']}")
    wall = phase.seconds
    cpu = phase.cpu
    parts = [f"server {cpu['server'] / wall:.2f}"]
    if cpu["postgres"]:
        parts.append(f"postgres {cpu['postgres'] / wall:.2f}")
    for role in ("me", "signin"):
        result = getattr(phase, role)
        if result is not None:
            parts.append(f"{role} generator {result['cpu'] / result['wall']:.2f}")
    ours = cpu["server"] + cpu["postgres"]
    ours += sum(r["cpu"] for r in (phase.me, phase.signin) if r is not None)
    others = max(0.0, cpu["machine"] - ours)
    cores = cpu["machine_total"] / wall
    print(
        f"   CPU (cores)     {', '.join(parts)}; machine {cpu['machine'] / wall:.2f} of "
        f"{cores:.0f} (others {others / wall:.2f})"
    )
    if phase.signin is not None and phase.signin["done"]:
        done = phase.signin["done"]
        me_requests = len(phase.me["latencies"]) if phase.me is not None else 0
        print(
            f"   CPU per sign-in server {cpu['server'] / done * 1000:.1f} ms"
            + (f", postgres {cpu['postgres'] / done * 1000:.1f} ms" if cpu["postgres"] else "")
            + (" (includes the /me requests)" if me_requests else "")
        )
    elif phase.me is not None and phase.me["latencies"]:
        count = len(phase.me["latencies"])
        print(
            f"   CPU per /me     server {cpu['server'] / count * 1000:.2f} ms"
            + (f", postgres {cpu['postgres'] / count * 1000:.2f} ms" if cpu["postgres"] else "")
        )
    return p99


async def main(_argv: list[str]) -> None:
    from soko.platform.config import Settings

    seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    rate = float(os.environ.get("BENCH_ME_RATE", "100"))
    clients = int(os.environ.get("BENCH_SIGNIN_CLIENTS", "8"))
    signin_rate = float(os.environ.get("BENCH_SIGNIN_RATE", "60"))
    workers = int(os.environ.get("BENCH_WORKERS", "1"))
    from bench.checkout import TRUST_AFTER, token_states

    trust_after = float(os.environ.get("BENCH_TRUST_AFTER", str(TRUST_AFTER)))
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-signin-"))
    url = os.environ.get("BENCH_DATABASE_URL") or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    env = {
        **os.environ,
        "SOKO_DATA_DIR": str(workdir),
        "SOKO_DATABASE_URL": url,
        "SOKO_SECRET_KEY": "bench-secret-key-bench-secret-key-0123456789",
        "SOKO_LOG_LEVEL": "WARNING",
        "SOKO_LOG_FORMAT": "json",
        # The benchmark measures hashing and serving, not the abuse limits (which stay
        # on: their per-request cost is part of serving).
        "SOKO_LOGIN_RATE_LIMIT": "1000000/minute",
        "SOKO_RATELIMIT_DEFAULT": "1000000/minute",
    }
    if os.environ.get("BENCH_HASH_THREADS"):
        env["SOKO_PASSWORD_HASH_THREADS"] = os.environ["BENCH_HASH_THREADS"]
    if os.environ.get("BENCH_HASH_POOL"):
        env["SOKO_PASSWORD_HASH_POOL"] = os.environ["BENCH_HASH_POOL"]
    metrics = workdir / "metrics"
    metrics.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    if workers > 1:
        env["SOKO_REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
        for backend in ("CACHE", "RATELIMIT", "PUBSUB"):
            env[f"SOKO_{backend}_BACKEND"] = "redis"
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=workdir,
        database_url=url,
        secret_key=env["SOKO_SECRET_KEY"],
        log_level="WARNING",
    )
    name = database_name(url)
    if name is not None and name.startswith("soko_bench"):
        await recreate_database(url)
    emails, hash_samples = await _prepare(settings, users=max(50, clients * 4))
    print(
        f"argon2id           m={settings.password_hash_memory_kib} KiB "
        f"t={settings.password_hash_iterations} p={settings.password_hash_parallelism}; "
        f"median hash time {statistics.median(hash_samples) * 1000:.1f} ms (one at a time)"
    )
    print(
        f"setup              {url.split(':')[0]}, {workers} server process(es), "
        f"{os.cpu_count()} cores, /me at {rate:.0f}/s, {clients} sign-in clients, "
        f"{seconds:.0f} s a phase; hashing in a "
        f"{env.get('SOKO_PASSWORD_HASH_POOL') or settings.password_hash_pool} pool of "
        f"{env.get('SOKO_PASSWORD_HASH_THREADS') or settings.password_hash_threads} a process"
    )
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "soko", "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    database = url.rpartition("/")[2] if url.startswith("postgresql") else None
    meter = CpuMeter(server.pid, database)
    try:
        await _wait_ready(port, server)
        await asyncio.sleep(trust_after)
        token = await _token(port, emails[0])
        await _phase("warm-up", meter, port=port, seconds=2, me_rate=rate, token=token,
                     clients=2, emails=emails)  # fmt: skip
        alone = await _phase("/me alone", meter, port=port, seconds=seconds, me_rate=rate,
                             token=token)  # fmt: skip
        burst = await _phase(f"/me + sign-ins at {signin_rate:.0f}/s", meter, port=port,
                             seconds=seconds, me_rate=rate, token=token,
                             signin_rate=signin_rate, emails=emails)  # fmt: skip
        flood = await _phase(f"/me + {clients} sign-in clients back to back", meter,
                             port=port, seconds=seconds, me_rate=rate, token=token,
                             clients=clients, emails=emails)  # fmt: skip
        only = await _phase("sign-ins alone, back to back", meter, port=port,
                            seconds=seconds, clients=clients, emails=emails)  # fmt: skip
        states = await token_states(port)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(
        f"/me token         issued {trust_after:.0f} s after the server was ready; its state "
        f"taken from the token {states.get('token', 0):.0f} times, read "
        f"{states.get('read', 0):.0f} times"
    )
    reference = _report(alone, reference_p99=None)
    during = _report(burst, reference_p99=reference)
    _report(flood, reference_p99=reference)
    _report(only, reference_p99=None)
    if reference and during and burst.signin and flood.signin:
        served = burst.signin["done"] - burst.signin["errors"]
        capacity = flood.signin["done"] / flood.signin["wall"]
        print(
            f"goals              sign-ins {capacity:.1f}/s at most beside /me (goal >= 60); "
            f"/me p99 {during:.1f} ms during {served / burst.signin['wall']:.0f} sign-ins/s vs "
            f"{reference:.1f} ms alone = {during / reference:.2f}x (goal <= 1.5)"
        )


if __name__ == "__main__":
    _generator_main(sys.argv[1:])
