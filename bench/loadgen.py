"""Load generation and accounting shared by the commerce benchmarks.

A generator is a process of its own (``python -m bench.loadgen <spec>``) speaking raw
HTTP/1.1 over keep-alive connections through an ``asyncio.Protocol`` on uvloop: about
a tenth of the CPU of a stream-based client and a fraction of httpx's, which matters on
two cores where the generator, the server, PostgreSQL and Redis share the same CPUs.

Two shapes of load:

* ``closed``: ``connections`` clients each send their next request as soon as the last
  answer arrived. That finds capacity (how many answers a second the server gives when
  it is never idle); its latencies are not the ones a user sees, and are not reported
  as such.
* ``open``: request ``i`` is due at ``start + i / rate`` whatever happened before, and
  its latency is counted from that due time, so neither a stalled server nor a stalled
  generator can hide queueing (no coordinated omission). A request that finds no idle
  connection opens one, up to ``max_connections``; beyond that it waits for one, and the
  wait is counted too.

Each request records its status, the problem ``type`` of an error answer, its due and
completion times, and optionally its body; the harness draws its figures from those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


# -- raw requests --------------------------------------------------------------------------


def get_request(path: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: soko-bench\r\n{extra}\r\n".encode()


def post_json(path: str, payload: Any, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: soko-bench\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


# -- a minimal HTTP/1.1 keep-alive client ------------------------------------------------------


class ConnectionLost(ConnectionError):
    pass


@dataclass(slots=True)
class Response:
    status: int
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == wanted:
                return value.strip().decode("latin-1")
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class HttpProtocol(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.head_end = -1
        self.length = 0
        self.alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end
            self.length = 0
            lower = bytes(self.buffer[:end]).lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                self.length = int(lower[at + 17 : stop if stop >= 0 else end])
            elif b"\r\ntransfer-encoding:" in lower:
                self._fail(RuntimeError("chunked responses are not expected here"))
                return
        total = self.head_end + 4 + self.length
        if len(self.buffer) < total:
            return
        head = bytes(self.buffer[: self.head_end])
        body = bytes(self.buffer[self.head_end + 4 : total])
        del self.buffer[:total]
        self.head_end = -1
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(int(head[9:12]), head, body))

    def _fail(self, exc: Exception) -> None:
        self.alive = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionLost(repr(exc) if exc else "closed by the server"))

    async def request(self, raw: bytes) -> Response:
        if not self.alive or self.transport is None:
            raise ConnectionLost("closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> HttpProtocol:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(HttpProtocol, "127.0.0.1", port)
    return protocol


async def fetch(port: int, raw: bytes) -> Response:
    """One request on a connection of its own (setup and checks, not load)."""
    connection = await connect(port)
    try:
        return await connection.request(raw)
    finally:
        connection.close()


def problem_type(response: Response) -> str:
    """The problem slug of an error answer (``out-of-stock``), else ``""``."""
    if response.status < 400:
        return ""
    try:
        kind = json.loads(response.body).get("type", "")
    except (ValueError, AttributeError):
        return "(not json)"
    return str(kind).rpartition("/")[2]


# -- the generator process ---------------------------------------------------------------------


def _cpu_self() -> float:
    usage = os.times()
    return usage.user + usage.system


class _Pool:
    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.limit = limit
        self.idle: list[HttpProtocol] = []
        self.opened = 0
        self.waiters: list[asyncio.Future[HttpProtocol]] = []

    async def take(self) -> HttpProtocol:
        while self.idle:
            connection = self.idle.pop()
            if connection.alive:
                return connection
            self.opened -= 1
        if self.opened < self.limit:
            self.opened += 1
            try:
                return await connect(self.port)
            except BaseException:
                self.opened -= 1
                raise
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def give(self, connection: HttpProtocol) -> None:
        if not connection.alive:
            self.opened -= 1
            if self.waiters:  # let a waiter open a fresh one
                waiter = self.waiters.pop(0)
                task = asyncio.ensure_future(self.take())
                task.add_done_callback(lambda t: _settle(waiter, t))
            return
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(connection)
                return
        self.idle.append(connection)

    def close(self) -> None:
        for connection in self.idle:
            connection.close()


def _settle(waiter: asyncio.Future[HttpProtocol], task: asyncio.Task[HttpProtocol]) -> None:
    if waiter.done():
        return
    if task.exception() is not None:
        waiter.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        waiter.set_result(task.result())


async def _send(pool: _Pool, raw: bytes) -> Response:
    connection = await pool.take()
    try:
        try:
            response = await connection.request(raw)
        except ConnectionLost:
            # The server closed a connection idle past its keep-alive timeout, as
            # HTTP/1.1 allows; a browser retries on a new one too.
            pool.give(connection)
            connection = await pool.take()
            response = await connection.request(raw)
    except BaseException:
        connection.close()
        pool.give(connection)
        raise
    pool.give(connection)
    return response


@dataclass
class LoadSpec:
    """What one generator process does. ``requests`` are cycled through in order."""

    port: int
    mode: str  # "open" | "closed"
    requests: list[str]  # latin-1 text of the raw requests (JSON-safe)
    start: float  # wall-clock time (time.time()) to begin at
    seconds: float = 0.0  # how long, unless ``count`` is set
    rate: float = 0.0  # open: requests a second
    count: int = 0  # exactly this many requests (0: for ``seconds``)
    connections: int = 16  # closed: clients; open: the connection cap
    keep_bodies: list[int] = field(default_factory=list)  # statuses whose bodies to return
    offset: float = 0.0  # open: this process's phase within the schedule, in 1/rate units


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    raws = [text.encode("latin-1") for text in spec.requests]
    pool = _Pool(spec.port, spec.connections)
    # Open the connections before the clock starts, as a browser already holds them.
    warm = [await connect(spec.port) for _ in range(min(spec.connections, 64))]
    pool.opened = len(warm)
    pool.idle.extend(warm)
    records: list[list[Any]] = []  # [index, status, problem, due, done]
    bodies: dict[int, str] = {}
    errors: list[str] = []
    lateness: list[float] = []
    keep = set(spec.keep_bodies)

    await asyncio.sleep(max(0.0, spec.start - time.time()))
    # uvloop's loop.time() counts whole milliseconds: time with perf_counter instead.
    now = time.perf_counter
    cpu_before = _cpu_self()
    began = now()

    async def one(index: int, due: float) -> None:
        lateness.append(now() - due)
        try:
            response = await _send(pool, raws[index % len(raws)])
        except (OSError, ConnectionError, RuntimeError) as exc:
            errors.append(repr(exc))
            records.append([index, 0, "connection", due - began, now() - began])
            return
        records.append([index, response.status, problem_type(response), due - began, now() - began])
        if response.status in keep:
            bodies[index] = response.body.decode()

    if spec.mode == "open":
        total = spec.count or int(spec.rate * spec.seconds)
        tasks: set[asyncio.Task[None]] = set()
        index = 0
        while index < total:
            # Start every request already due, then sleep until the next one: one timer
            # per millisecond or so instead of one per request. A request started up to
            # that late still counts its latency from its due time.
            current = now()
            while index < total:
                due = began + (index + spec.offset) / spec.rate
                if due > current:
                    break
                task = loop.create_task(one(index, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                index += 1
            if index < total:
                # At least a millisecond: uvloop's timers have no finer grain, and a
                # shorter sleep returns at once and spins.
                await asyncio.sleep(max(0.001, began + (index + spec.offset) / spec.rate - now()))
        while tasks:
            await asyncio.gather(*list(tasks))
    else:
        # With ``count``, each request is sent once (request i is requests[i]) and the
        # phase ends when all are answered; otherwise after ``seconds``.
        deadline = began + (spec.seconds if not spec.count else 1e9)
        limit = spec.count or 1 << 62
        counter = iter(range(limit))

        async def client() -> None:
            while now() < deadline:
                index = next(counter, None)
                if index is None:
                    return
                await one(index, now())

        await asyncio.gather(*(client() for _ in range(spec.connections)))
    wall = now() - began
    cpu = _cpu_self() - cpu_before
    pool.close()
    return {
        "records": records,
        "bodies": bodies,
        "errors": errors[:5],
        "error_count": len(errors),
        "cpu": cpu,
        "wall": wall,
        "late_p99": percentile(lateness, 99),
        "connections": pool.opened,
    }


def _generator_main(argv: list[str]) -> None:
    """``python -m bench.loadgen <spec file>``: one generator; writes its result beside
    the spec (``<spec>.out``), not to a pipe an event loop may have made non-blocking."""
    path = Path(argv[0])
    spec = LoadSpec(**json.loads(path.read_text()))
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(run_load(spec))
    Path(f"{path}.out").write_text(json.dumps(result))


def spawn(spec: LoadSpec, workdir: Path, name: str) -> subprocess.Popen[bytes]:
    path = workdir / f"load-{name}.json"
    path.write_text(json.dumps(spec.__dict__))
    Path(f"{path}.out").unlink(missing_ok=True)
    return subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(path)], cwd=ROOT)


def collect(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    process.wait(timeout=1800)
    if process.returncode != 0:
        raise SystemExit(f"a load generator failed ({process.returncode})")
    result: dict[str, Any] = json.loads(Path(f"{process.args[-1]}.out").read_text())  # type: ignore[index]
    return result


# -- CPU accounting ----------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one live process, its threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        found[int(entry.name)] = (parent, title)
    return found


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, (parent, _) in table.items() if parent in frontier]
        found += frontier
    return found


def _machine_cpu() -> tuple[float, float, float]:
    """(busy, total, stolen) CPU seconds of the whole machine since boot, all cores.
    Busy includes stolen time: what the hypervisor gave to other guests while this one
    wanted to run."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS, fields[7] / CLOCK_TICKS


# How many of the server's processes the CPU line names apart, busiest first, and how
# much busier than the next the busiest may be before the line calls the phase uneven.
SERVER_PROCESSES_SHOWN = 3
UNEVEN_RATIO = 1.6


@dataclass
class CpuMeter:
    """CPU seconds used during one phase by the server, PostgreSQL (the backends of the
    benchmark's database), Redis and the machine (the generators count their own).

    Counted per process: one that started during the phase counts from zero, one that
    ended during it counts nothing, so the figures can only be low, never negative."""

    server_pid: int
    database: str | None
    before: dict[str, dict[int, float]] = field(default_factory=dict)
    machine_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    started: float = 0.0
    by_server_process: list[float] = field(default_factory=list)

    def _sample(self) -> dict[str, dict[int, float]]:
        table = _processes()
        backends = [
            pid
            for pid, (_, title) in table.items()
            if self.database and title.startswith("postgres:") and f" {self.database} " in title
        ]
        redis = [pid for pid, (_, title) in table.items() if title.startswith("redis-server")]
        return {
            "server": {pid: _proc_cpu(pid) for pid in _descendants(self.server_pid, table)},
            "postgres": {pid: _proc_cpu(pid) for pid in backends},
            "redis": {pid: _proc_cpu(pid) for pid in redis},
        }

    def start(self) -> None:
        self.before = self._sample()
        self.machine_before = _machine_cpu()
        self.started = time.monotonic()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        busy, total, stolen = _machine_cpu()
        used = {
            party: sum(
                max(0.0, cpu - self.before.get(party, {}).get(pid, 0.0))
                for pid, cpu in pids.items()
            )
            for party, pids in after.items()
        }
        # Each server process apart (its API processes above all): a phase whose
        # connections landed mostly on one process shows one busy and one idle.
        self.by_server_process = sorted(
            (
                max(0.0, cpu - self.before.get("server", {}).get(pid, 0.0))
                for pid, cpu in after["server"].items()
            ),
            reverse=True,
        )
        used["machine"] = busy - self.machine_before[0]
        used["machine_total"] = total - self.machine_before[1]
        used["steal"] = stolen - self.machine_before[2]
        used["wall"] = time.monotonic() - self.started
        for rank, cpu in enumerate(self.by_server_process[:SERVER_PROCESSES_SHOWN]):
            used[f"server_process_{rank}"] = cpu
        return used


def describe_cpu(cpu: dict[str, float], generator_cpu: float) -> str:
    """``server 1.20, postgres 0.40, redis 0.10, generator 0.15; machine 1.95 of 2
    (others 0.05, stolen 0.05)`` in cores over the phase. ``stolen`` is the time a
    virtual machine's hypervisor ran other guests instead (Linux's steal time): a busy
    host takes it from whoever wanted the CPU then."""
    wall = cpu["wall"] or 1.0
    ours = cpu["server"] + cpu["postgres"] + cpu["redis"] + generator_cpu
    shown = [
        cpu[name] / wall
        for rank in range(SERVER_PROCESSES_SHOWN)
        if (name := f"server_process_{rank}") in cpu
    ]
    busiest = [f"{cores:.2f}" for cores in shown]
    # Connections are spread over the API processes by the kernel (SO_REUSEPORT hashes
    # each one): a few dozen can land mostly on one, which then caps the phase.
    uneven = (
        "; UNEVEN: one server process did most of the work (the kernel spread the "
        "connections unevenly): rerun for a comparable figure"
        if len(shown) >= 2 and shown[0] > UNEVEN_RATIO * shown[1] and shown[0] > 0.2
        else ""
    )
    stolen = cpu.get("steal", 0.0)
    others = max(0.0, cpu["machine"] - ours - stolen)
    cores = cpu["machine_total"] / wall
    return (
        f"server {cpu['server'] / wall:.2f} ({' + '.join(busiest)} busiest), "
        f"postgres {cpu['postgres'] / wall:.2f}, "
        f"redis {cpu['redis'] / wall:.2f}, generator {generator_cpu / wall:.2f}; "
        f"machine {cpu['machine'] / wall:.2f} of {cores:.0f} (others {others / wall:.2f}, "
        f"stolen {stolen / wall:.2f}){uneven}"
    )


# -- servers -----------------------------------------------------------------------------------


async def wait_ready(port: int, server: subprocess.Popen[bytes], path: str = "/health") -> None:
    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            response = await fetch(port, get_request(path))
        except (OSError, ConnectionError):
            await asyncio.sleep(0.1)
            continue
        if response.status == 200:
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the server did not start")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    server.send_signal(15)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def run_phase(
    specs: list[LoadSpec], meter: CpuMeter, workdir: Path, name: str
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run generators together; their results and the phase's CPU accounting."""
    processes = [spawn(spec, workdir, f"{name}-{i}") for i, spec in enumerate(specs)]
    start = min(spec.start for spec in specs)
    await asyncio.sleep(max(0.0, start - time.time()))
    meter.start()
    results = [await asyncio.to_thread(collect, process) for process in processes]
    cpu = meter.stop()
    return results, cpu


if __name__ == "__main__":
    _generator_main(sys.argv[1:])


# -- databases, Redis and the server under test ----------------------------------------------

SECRET_KEY = "bench-secret-key-bench-secret-key-0123456789"


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def database_name(url: str) -> str | None:
    return url.rpartition("/")[2].partition("?")[0] if url.startswith("postgresql") else None


async def recreate_database(url: str) -> None:
    """Drop and create the PostgreSQL database ``url`` names (the benchmark's own)."""
    import asyncpg

    name = database_name(url)
    if name is None:
        return
    if not name.startswith("soko_bench"):
        raise SystemExit(f"refusing to drop {name!r}: benchmark databases are named soko_bench*")
    admin = await asyncpg.connect(_plain_dsn(url).rpartition("/")[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def drop_database(url: str) -> None:
    import asyncpg

    name = database_name(url)
    if name is None or not name.startswith("soko_bench"):
        return
    admin = await asyncpg.connect(_plain_dsn(url).rpartition("/")[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def flush_redis(url: str) -> None:
    """Empty the benchmark's own Redis database (its number is in ``url``)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def server_env(
    workdir: Path, url: str, *, workers: int, redis_url: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = {
        **os.environ,
        "SOKO_DATA_DIR": str(workdir),
        "SOKO_DATABASE_URL": url,
        "SOKO_SECRET_KEY": SECRET_KEY,
        "SOKO_LOG_LEVEL": "WARNING",
        "SOKO_LOG_FORMAT": "json",
        "SOKO_SEED_DEMO": "false",
        # The abuse limits stay on (their per-request cost is part of serving), far
        # above what the benchmark sends from its one address.
        "SOKO_RATELIMIT_DEFAULT": "100000000/minute",
    }
    if workers > 1:
        env["SOKO_REDIS_URL"] = redis_url
        for backend in ("CACHE", "RATELIMIT", "PUBSUB"):
            env[f"SOKO_{backend}_BACKEND"] = "redis"
    env.update(extra or {})
    return env


def start_soko(
    env: dict[str, str], port: int, workers: int, *, log: Path, factory: str | None = None
) -> subprocess.Popen[bytes]:
    """``soko serve`` on ``port``, its output appended to ``log``; ``factory`` serves
    another app factory through the same command (uvicorn settings, worker processes,
    shutdown) instead of Soko's own."""
    if factory is None:
        command = [sys.executable, "-m", "soko"]
    else:
        command = [
            sys.executable,
            "-c",
            "import sys, soko.cli as cli; cli.APP_FACTORY = sys.argv.pop(1); "
            "cli.app(prog_name='soko')",
            factory,
        ]
    command += ["serve", "--port", str(port), "--workers", str(workers)]
    with log.open("ab") as sink:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=sink, stderr=sink)
