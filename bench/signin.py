"""Sign-in throughput at the configured Argon2id cost, and what a burst of sign-ins does
to the latency of ordinary authenticated reads.

Starts a real ``soko serve`` process on a free loopback port against a fresh database,
creates users, then:

1. median Argon2id hash time at the configured parameters (in this process);
2. baseline: ``GET /api/v1/me`` at a fixed arrival rate (open loop: latency is measured
   from each request's *scheduled* send time, so a stalled server cannot hide queueing);
3. burst: the same ``GET /api/v1/me`` load while many clients sign in as fast as they can;
   prints sign-ins per second and the p99 of ``/me`` with and without the burst.

    python -m bench signin                      # SQLite in a temporary directory
    BENCH_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench \\
        python -m bench signin                  # an existing PostgreSQL database (emptied)

Settings: BENCH_SECONDS (10), BENCH_ME_RATE (100 requests/s), BENCH_SIGNIN_CLIENTS (8).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

from soko.app import load_models
from soko.identity.accounts import create_user
from soko.identity.models import Role
from soko.identity.passwords import password_hasher
from soko.platform.config import Settings
from soko.platform.db import Base, create_engine
from soko.platform.runtime import Runtime

PASSWORD = "correct horse battery staple 42"


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


async def _prepare(settings: Settings, users: int) -> list[str]:
    load_models()
    engine = create_engine(settings.effective_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    await engine.dispose()
    runtime = Runtime(settings)
    hasher = password_hasher(runtime)
    began = time.perf_counter()
    samples = []
    stored = ""
    for _ in range(30):
        start = time.perf_counter()
        stored = await hasher.hash(PASSWORD)
        samples.append(time.perf_counter() - start)
    print(
        f"argon2id           m={settings.password_hash_memory_kib} KiB "
        f"t={settings.password_hash_iterations} p={settings.password_hash_parallelism}"
    )
    print(
        f"median hash time   {statistics.median(samples) * 1000:.1f} ms "
        f"({time.perf_counter() - began:.1f} s for 30)"
    )
    emails = []
    async with runtime.db.transaction() as session:
        for index in range(users):
            email = f"bench-{index}@example.com"
            await create_user(
                session,
                runtime.data_keys,
                now=runtime.clock.now(),
                email=email,
                password_hash=stored,
                roles=(Role.customer,),
                email_verified=True,
            )
            emails.append(email)
    await runtime.stop()
    return emails


async def _wait_ready(base: str) -> None:
    async with httpx2.AsyncClient(base_url=base) as client:
        for _ in range(200):
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the server did not start")


async def _sign_in(client: httpx2.AsyncClient, email: str) -> str:
    response = await client.post(
        "/api/v1/auth/login", json={"identifier": email, "password": PASSWORD}
    )
    if response.status_code != 200:
        raise SystemExit(f"sign-in failed: {response.status_code} {response.text[:200]}")
    return str(response.json()["access_token"])


async def _me_load(
    client: httpx2.AsyncClient, token: str, rate: float, seconds: float
) -> tuple[list[float], int]:
    """Open-loop GET /me: request i is due at start + i/rate whatever happened before."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    total = int(rate * seconds)
    headers = {"Authorization": f"Bearer {token}"}

    async def one(due: float) -> None:
        nonlocal errors
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        response = await client.get("/api/v1/me", headers=headers)
        if response.status_code != 200:
            errors += 1
        latencies.append(time.perf_counter() - due)

    await asyncio.gather(*(one(start + i / rate) for i in range(total)))
    return latencies, errors


async def _burst(
    client: httpx2.AsyncClient, emails: list[str], clients: int, seconds: float
) -> int:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < deadline:
            await _sign_in(client, emails[index % len(emails)])
            done += 1
            index += clients

    await asyncio.gather(*(worker(i) for i in range(clients)))
    return done


async def main(_argv: list[str]) -> None:
    seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    rate = float(os.environ.get("BENCH_ME_RATE", "100"))
    clients = int(os.environ.get("BENCH_SIGNIN_CLIENTS", "8"))
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-signin-"))
    url = os.environ.get("BENCH_DATABASE_URL") or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    env = {
        **os.environ,
        "SOKO_DATA_DIR": str(workdir),
        "SOKO_DATABASE_URL": url,
        "SOKO_SECRET_KEY": "bench-secret-key-bench-secret-key-0123456789",
        "SOKO_LOG_LEVEL": "WARNING",
        "SOKO_LOG_FORMAT": "json",
        # The benchmark measures hashing and serving, not the abuse limits.
        "SOKO_LOGIN_RATE_LIMIT": "1000000/minute",
        "SOKO_RATELIMIT_DEFAULT": "1000000/minute",
    }
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=workdir,
        database_url=url,
        secret_key=env["SOKO_SECRET_KEY"],
        log_level="WARNING",
    )
    emails = await _prepare(settings, users=max(50, clients * 4))
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "soko", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(base)
        limits = httpx2.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx2.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
            token = await _sign_in(client, emails[0])
            await _me_load(client, token, rate, 2)  # warm up
            baseline, base_errors = await _me_load(client, token, rate, seconds)
            me_task = asyncio.create_task(_me_load(client, token, rate, seconds))
            began = time.perf_counter()
            signed_in = await _burst(client, emails, clients, seconds)
            burst_seconds = time.perf_counter() - began
            during, burst_errors = await me_task
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    p99_base = _percentile(baseline, 99) * 1000
    p99_burst = _percentile(during, 99) * 1000
    print(f"database           {url.split(':')[0]}")
    print(
        f"sign-ins           {signed_in / burst_seconds:.1f}/s "
        f"({signed_in} in {burst_seconds:.1f} s, {clients} concurrent clients)"
    )
    print(
        f"GET /me p50/p99    {_percentile(baseline, 50) * 1000:.1f} / {p99_base:.1f} ms "
        f"alone at {rate:.0f}/s ({base_errors} errors)"
    )
    print(
        f"GET /me p50/p99    {_percentile(during, 50) * 1000:.1f} / {p99_burst:.1f} ms "
        f"during the burst ({burst_errors} errors)"
    )
    print(f"p99 ratio          {p99_burst / p99_base:.2f} (goal: at most 1.5)")
