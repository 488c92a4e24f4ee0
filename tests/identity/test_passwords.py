"""Password hashing (Argon2id off the event loop, transparent rehash) and the policy."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import threading
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import argon2
import pytest
from starlette.types import Receive, Scope, Send

from soko.identity.errors import WeakPassword
from soko.identity.hashing import HASH_NICENESS, SodiumArgon2Hasher, password_hash, perform
from soko.identity.passwords import (
    MAX_PASSWORD_LENGTH,
    HashWorkerFailed,
    PasswordHasher,
    PasswordPolicy,
    common_passwords,
    normalize_password,
    password_hasher,
)
from soko.platform.admission import AdmissionMiddleware
from soko.platform.runtime import Runtime
from tests.conftest import make_settings
from tests.platform.test_admission import gate_of, start

OWASP = {"memory_kib": 19_456, "iterations": 2, "parallelism": 1}
PASSPHRASE = "mvua ya masika 2031"


@pytest.fixture(params=["thread", "process"])
async def hasher(request: pytest.FixtureRequest) -> AsyncIterator[PasswordHasher]:
    """Each hashing test runs on both pools: threads of this process, and worker
    processes."""
    hasher = PasswordHasher(**OWASP, threads=2, pool=request.param)
    yield hasher
    await hasher.aclose()


def full_width(text: str) -> str:
    """``text`` as an East Asian keyboard's full-width forms (U+FF01 to U+FF5E)."""
    return "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in text)


def parameters_of(stored_hash: str) -> str:
    return stored_hash.split("$")[3]


# -- hashing ----------------------------------------------------------------------------


async def test_hash_round_trip(hasher: PasswordHasher) -> None:
    stored = await hasher.hash(PASSPHRASE)
    assert stored.startswith("$argon2id$v=19$")
    assert parameters_of(stored) == "m=19456,t=2,p=1"
    assert PASSPHRASE not in stored
    assert await hasher.verify(PASSPHRASE, stored) == (True, None)
    # A fresh salt every time.
    assert await hasher.hash(PASSPHRASE) != stored


async def test_wrong_password_is_refused(hasher: PasswordHasher) -> None:
    stored = await hasher.hash(PASSPHRASE)
    assert await hasher.verify(PASSPHRASE + "!", stored) == (False, None)
    assert await hasher.verify(PASSPHRASE.upper(), stored) == (False, None)
    assert await hasher.verify("", stored) == (False, None)


async def test_changed_parameters_rehash_on_the_next_correct_sign_in(
    hasher: PasswordHasher,
) -> None:
    stored = await hasher.hash(PASSPHRASE)
    stronger = PasswordHasher(
        memory_kib=19_456 * 2, iterations=3, parallelism=1, threads=1, pool=hasher.pool
    )
    try:
        assert stronger.needs_rehash(stored)
        ok, new_hash = await stronger.verify(PASSPHRASE, stored)
        assert ok
        assert new_hash is not None
        assert parameters_of(new_hash) == "m=38912,t=3,p=1"
        assert not stronger.needs_rehash(new_hash)
        assert await stronger.verify(PASSPHRASE, new_hash) == (True, None)
        # A wrong password never yields a hash to store.
        assert await stronger.verify("not it at all", stored) == (False, None)
    finally:
        await stronger.aclose()


async def test_older_argon2_variant_is_upgraded_to_argon2id(hasher: PasswordHasher) -> None:
    legacy = argon2.PasswordHasher(type=argon2.Type.I).hash(PASSPHRASE)
    assert legacy.startswith("$argon2i$")
    ok, new_hash = await hasher.verify(PASSPHRASE, legacy)
    assert ok
    assert new_hash is not None
    assert new_hash.startswith("$argon2id$")


async def test_missing_or_unreadable_hash_is_a_wrong_password(hasher: PasswordHasher) -> None:
    assert await hasher.verify(PASSPHRASE, None) == (False, None)
    assert await hasher.verify(PASSPHRASE, PASSPHRASE) == (False, None)
    assert await hasher.verify(PASSPHRASE, "$2b$12$notreallyabcryptatall") == (False, None)
    assert hasher.needs_rehash(PASSPHRASE)


async def test_dummy_verification_costs_a_real_one(hasher: PasswordHasher) -> None:
    await hasher.dummy_verify()
    # It verifies against a hash made with the current parameters, so it does the same
    # work as verifying a real account's password.
    assert hasher._dummy_hash is not None
    assert parameters_of(hasher._dummy_hash) == "m=19456,t=2,p=1"
    assert hasher._dummy_hash.startswith("$argon2id$")


async def test_passwords_are_compared_in_nfkc(hasher: PasswordHasher) -> None:
    composed = "caf\u00e9 ya asubuhi"
    decomposed = "cafe\u0301 ya asubuhi"
    assert composed != decomposed
    stored = await hasher.hash(composed)
    assert await hasher.verify(decomposed, stored) == (True, None)
    # Full-width forms from an East Asian keyboard fold to their ASCII letters.
    assert full_width("safari njema") != "safari njema"
    stored = await hasher.hash(full_width("safari njema"))
    assert await hasher.verify("safari njema", stored) == (True, None)


async def test_hashing_leaves_the_event_loop_free(hasher: PasswordHasher) -> None:
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    # Control: the same work run on the loop's own thread starves the ticker entirely.
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    blocking = argon2.PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)
    for index in range(8):
        blocking.hash(f"{PASSPHRASE} {index}")
    assert ticks == before

    # The hasher: eight hashes in its pool while the ticker keeps running.
    before = ticks
    hashes = await asyncio.gather(*(hasher.hash(f"{PASSPHRASE} {i}") for i in range(8)))
    during = ticks - before
    done.set()
    await task
    assert len(set(hashes)) == 8
    assert during >= 50, f"the event loop ticked only {during} times during 8 hashes"


async def test_one_hasher_per_runtime(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'hasher.db'}",
        password_hash_iterations=3,
        password_hash_threads=3,
    )
    runtime = Runtime(settings)
    other = Runtime(settings)
    try:
        hasher = password_hasher(runtime)
        assert password_hasher(runtime) is hasher
        assert password_hasher(other) is not hasher
        assert hasher.iterations == 3
        assert hasher.memory_kib == 19_456
        assert parameters_of(await hasher.hash(PASSPHRASE)) == "m=19456,t=3,p=1"
    finally:
        await runtime.stop()
        await other.stop()


# -- worker processes ---------------------------------------------------------------------


@pytest.fixture
async def in_processes() -> AsyncIterator[PasswordHasher]:
    hasher = PasswordHasher(**OWASP, threads=2, pool="process")
    yield hasher
    await hasher.aclose()


def workers_of(hasher: PasswordHasher) -> list[Any]:
    return list(hasher._backend._workers)  # type: ignore[union-attr]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_worker_processes_do_the_hashing_at_a_lower_priority(
    in_processes: PasswordHasher,
) -> None:
    stored = await in_processes.hash(PASSPHRASE)
    (first,) = workers_of(in_processes)
    before = cpu_ticks(first.process.pid)
    answers = await asyncio.gather(*(in_processes.verify(PASSPHRASE, stored) for _ in range(8)))
    assert answers == [(True, None)] * 8
    workers = workers_of(in_processes)
    assert len(workers) == 2  # as many as the pool's size, never more
    assert all(worker.process.pid != os.getpid() for worker in workers)
    assert cpu_ticks(first.process.pid) > before  # the hashing ran there
    here = os.getpriority(os.PRIO_PROCESS, 0)
    for worker in workers:
        assert os.getpriority(os.PRIO_PROCESS, worker.process.pid) == min(
            19, max(here, 0) + HASH_NICENESS
        )


async def test_a_worker_that_dies_is_replaced(in_processes: PasswordHasher) -> None:
    stored = await in_processes.hash(PASSPHRASE)
    (first,) = workers_of(in_processes)
    first.process.kill()
    await first.process.wait()
    assert await in_processes.verify(PASSPHRASE, stored) == (True, None)
    assert first not in workers_of(in_processes)
    assert len(workers_of(in_processes)) == 1


async def test_a_caller_gone_mid_hash_leaves_every_answer_to_its_own_request() -> None:
    """A request cancelled while its worker computes (a client that went away) lets the
    exchange finish: the worker's late answer never reaches the next request."""
    hasher = PasswordHasher(**OWASP, threads=1, pool="process")
    try:
        stored = await hasher.hash(PASSPHRASE)
        (worker,) = workers_of(hasher)
        abandoned = asyncio.create_task(hasher.verify(PASSPHRASE, stored))
        await asyncio.sleep(0.002)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert await hasher.verify("not the passphrase", stored) == (False, None)
        assert await hasher.verify(PASSPHRASE, stored) == (True, None)
        assert workers_of(hasher) == [worker]  # the same worker, reused
    finally:
        await hasher.aclose()


async def test_closing_stops_the_workers() -> None:
    hasher = PasswordHasher(**OWASP, threads=2, pool="process")
    await hasher.start()
    workers = workers_of(hasher)
    assert len(workers) == 2  # started before any hash, as the server does
    await asyncio.gather(*(hasher.hash(PASSPHRASE) for _ in range(4)))
    assert workers_of(hasher) == workers
    await hasher.aclose()
    assert all(worker.process.returncode == 0 for worker in workers)
    with pytest.raises(HashWorkerFailed):
        await hasher.hash(PASSPHRASE)


async def test_runtime_stop_stops_its_hashing_workers(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'workers.db'}",
        password_hash_pool="process",
    )
    runtime = Runtime(settings)
    try:
        hasher = password_hasher(runtime)
        assert hasher.pool == "process"
        await hasher.hash(PASSPHRASE)
        (worker,) = workers_of(hasher)
    finally:
        await runtime.stop()
    assert worker.process.returncode == 0


def test_the_worker_answers_errors_without_echoing_secrets() -> None:
    hasher = password_hash(**OWASP)
    answer = perform(hasher, {"op": "verify", "password": PASSPHRASE, "hash": "$2b$12$x"})
    assert answer == {"error": "unknown_hash"}
    answer = perform(hasher, {"op": "verify", "password": PASSPHRASE})
    assert answer == {"error": "failed", "kind": "KeyError"}
    assert perform(hasher, {"op": "drop", "password": PASSPHRASE})["error"] == "failed"


def test_the_worker_process_speaks_one_json_line_per_request() -> None:
    """The worker's own loop: bad lines get an answer and the next request is served;
    it exits cleanly when its input closes."""
    request = {"op": "hash", "password": PASSPHRASE}
    lines = [b"not json\n", b"[1, 2]\n", json.dumps(request).encode() + b"\n"]
    done = subprocess.run(
        [sys.executable, "-m", "soko.identity.hashing", "19456", "2", "1"],
        input=b"".join(lines),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    ready, *answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert ready == {"ready": True}
    assert answers[:2] == [{"error": "failed", "kind": "BadRequest"}] * 2
    assert answers[2]["result"].startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PASSPHRASE.encode() not in done.stdout + done.stderr


# -- policy -----------------------------------------------------------------------------


def reasons(password: str, policy: PasswordPolicy | None = None, **account: str) -> list[str]:
    policy = policy or PasswordPolicy()
    return [code for code, _ in policy.problems(password, **account)]


def test_blocklist_has_at_least_ten_thousand_passwords() -> None:
    blocklist = common_passwords()
    assert len(blocklist) >= 10_000
    assert {"password", "123456", "qwertyuiop", "password123", "iloveyou"} <= blocklist
    assert all(entry == entry.lower() and entry.strip() == entry for entry in blocklist)


def test_blocklist_ships_inside_the_package() -> None:
    import soko.identity

    data = Path(soko.identity.__file__).parent / "data"
    lines = gzip.decompress((data / "common-passwords.txt.gz").read_bytes()).splitlines()
    assert len(lines) == len(common_passwords())
    assert "MIT License" in (data / "README.md").read_text("utf-8")


def test_short_passwords_are_refused() -> None:
    assert reasons("kahawa!") == ["too_short"]
    assert reasons("kahawa!22") == ["too_short"]  # 9 characters
    assert reasons("kahawa!227") == []  # 10
    stricter = PasswordPolicy.from_settings(
        make_settings(Path("/nonexistent"), password_min_length=14)
    )
    assert stricter.min_length == 14
    assert reasons("kahawa!227", stricter) == ["too_short"]


def test_long_passwords_are_accepted_up_to_the_cap() -> None:
    sixty_four = "nyumba ndogo juu ya mlima, karibu na mto wenye maji baridi sana."
    assert len(sixty_four) == 64
    assert reasons(sixty_four) == []
    at_cap = (sixty_four * 4)[:MAX_PASSWORD_LENGTH]
    assert len(at_cap) == 256
    assert reasons(at_cap) == []
    assert reasons(at_cap + "x") == ["too_long"]


def test_refusal_is_a_weak_password_problem_with_reasons() -> None:
    policy = PasswordPolicy()
    with pytest.raises(WeakPassword) as refused:
        policy.check("x" * 257)
    problem = refused.value
    assert problem.status == 422
    assert problem.extensions["reasons"] == ["too_long"]
    assert problem.extensions["max_length"] == 256
    assert "at most 256 characters" in problem.detail

    with pytest.raises(WeakPassword) as refused:
        policy.check("Password1", email="someone@example.com")
    assert refused.value.extensions["reasons"] == ["too_short", "common"]
    assert refused.value.extensions["min_length"] == 10

    policy.check(PASSPHRASE, email="someone@example.com")


def test_common_passwords_are_refused_whatever_their_case() -> None:
    assert reasons("password123") == ["common"]
    assert reasons("PassWord123") == ["common"]
    assert reasons("QWERTYUIOP") == ["common"]
    assert reasons("1q2w3e4r5t") == ["common"]
    # Full-width characters fold to the same common password.
    assert reasons(full_width("password123")) == ["common"]


def test_repeated_and_sequential_passwords_are_refused() -> None:
    for password in (
        "aaaaaaaaaaaa",
        "abababababab",
        "xyzxyzxyzxyz",
        "abcdefghijkl",
        "zyxwvutsrqpo",
    ):
        assert reasons(password) == ["predictable"], password
    # Not every repetition is a pattern.
    assert reasons("banana bread!") == []


def test_own_email_phone_or_name_is_refused() -> None:
    account = {
        "email": "Wanjiru.Kamau@example.co.ke",
        "phone": "+254712345678",
        "display_name": "Wanjiru Kamau",
    }
    assert reasons("wanjiru.kamau@example.co.ke", **account) == ["matches_account"]
    assert reasons("wanjiru.kamau", **account) == ["matches_account"]
    assert reasons("WanjiruKamau", **account) == ["matches_account"]
    assert reasons("Wanjiru Kamau", **account) == ["matches_account"]
    assert reasons("+254712345678", **account) == ["matches_account"]
    assert reasons("254 712 345 678", **account) == ["matches_account"]
    assert reasons("0712 345 678", **account) == ["matches_account"]
    # Someone else's name is fine.
    assert reasons("Akinyi Otieno", **account) == []


def test_length_counts_code_points_after_nfkc() -> None:
    composed = "mañana sí!"  # 10 code points
    decomposed = unicodedata.normalize("NFD", composed)
    assert len(decomposed) == 12
    assert reasons(decomposed) == []
    short = "mañana sí"  # 9 code points, 11 before normalization
    assert len(unicodedata.normalize("NFD", short)) == 11
    assert reasons(unicodedata.normalize("NFD", short)) == ["too_short"]
    # A ligature counts as the letters it stands for.
    assert len(normalize_password("\ufb01")) == 2


def test_passwords_in_any_script_are_accepted() -> None:
    for password in (
        "ニワトリが空を飛ぶ日だ",
        "Кошка спит на окне",
        "ሰላም ለዓለም ሁሉ",
        "🐘🦒🦓 safari 🌍",
    ):
        assert len(normalize_password(password)) >= 10
        assert reasons(password) == [], password


# -- libsodium and argon2-cffi agree ----------------------------------------------------


def test_libsodium_hashes_verify_with_argon2_cffi_and_back() -> None:
    """Two independent implementations read each other's PHC strings: a hash stored by
    an older Soko (argon2-cffi) still verifies, and one libsodium writes is standard."""
    sodium = SodiumArgon2Hasher(time_cost=2, memory_cost=19_456, parallelism=1)
    reference = argon2.PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)

    ours = sodium.hash(PASSPHRASE)
    assert ours.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert reference.verify(ours, PASSPHRASE)
    assert not sodium.check_needs_rehash(ours)
    with pytest.raises(argon2.exceptions.VerifyMismatchError):
        reference.verify(ours, PASSPHRASE + "!")

    theirs = reference.hash(PASSPHRASE)
    assert sodium.verify(PASSPHRASE, theirs)
    assert sodium.verify(PASSPHRASE.encode(), theirs.encode())
    assert not sodium.verify(PASSPHRASE + "!", theirs)


def test_hashes_libsodium_cannot_compute_go_to_argon2_cffi() -> None:
    sodium = SodiumArgon2Hasher(time_cost=2, memory_cost=19_456, parallelism=1)
    two_lanes = argon2.PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=2)
    argon2i = argon2.PasswordHasher(type=argon2.Type.I)
    for stored in (two_lanes.hash(PASSPHRASE), argon2i.hash(PASSPHRASE)):
        assert sodium.verify(PASSPHRASE, stored)
        assert not sodium.verify("not it at all", stored)
    # A hasher configured with lanes writes them through argon2-cffi.
    laned = SodiumArgon2Hasher(time_cost=2, memory_cost=19_456, parallelism=2)
    stored = laned.hash(PASSPHRASE)
    assert ",p=2$" in stored
    assert laned.verify(PASSPHRASE, stored)


@pytest.mark.parametrize(
    "stored",
    [
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$AAAA",
        "$argon2id$v=19$m=19456,t=2,p=1$!!!$!!!",
        "$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$ünïcödé",
    ],
)
def test_a_damaged_hash_is_a_wrong_password(stored: str) -> None:
    sodium = SodiumArgon2Hasher(time_cost=2, memory_cost=19_456, parallelism=1)
    assert sodium.verify(PASSPHRASE, stored) is False


async def test_a_request_waiting_for_its_hash_gives_its_place_to_another(
    hasher: PasswordHasher,
) -> None:
    """A sign-in's hash is computed off the event loop (a worker process, or a thread):
    while the request waits for it, its place in the process's admission goes to another
    request, so a burst of sign-ins queued on the hashing never holds back a GET /me."""
    stored = await hasher.hash(PASSPHRASE)
    backend: Any = hasher._backend
    unblock = threading.Event()
    if hasher.pool == "thread":  # both threads busy
        busy = [backend._executor.submit(unblock.wait) for _ in range(2)]
    else:  # both workers' slots taken
        slots = backend._bound_slots()
        for _ in range(2):
            await slots.acquire()
    reached: dict[str, asyncio.Event] = {"/sign-in": asyncio.Event(), "/me": asyncio.Event()}
    verified: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached[scope["path"]].set()
        if scope["path"] == "/sign-in":
            verified.append((await hasher.verify(PASSPHRASE, stored))[0])

    middleware = AdmissionMiddleware(app, limit=1, queue_seconds=10)
    gate = gate_of(middleware)
    async with asyncio.timeout(10):
        sign_in = start(middleware, "/sign-in")
        await reached["/sign-in"].wait()
        me = start(middleware, "/me")
        await reached["/me"].wait()  # in while the sign-in waits for its hash
        await me
        assert not sign_in.done()
        if hasher.pool == "thread":
            unblock.set()
            for job in busy:
                job.result()
        else:
            slots.release()
            slots.release()
        await sign_in
    assert verified == [True]
    assert (gate.free, gate.waiting) == (1, 0)
