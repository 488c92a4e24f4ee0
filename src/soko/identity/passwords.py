"""Passwords: Argon2id hashing off the event loop, and the policy of NIST SP 800-63B.

Hashing and verifying cost ten to twenty milliseconds of CPU each (that is their
point), so they run off the event loop, in a pool owned by one :class:`PasswordHasher`
per runtime (:func:`password_hasher`). libsodium computes them
(:class:`soko.identity.hashing.SodiumArgon2Hasher`, behind pwdlib).

The pool is made of worker processes by default (``SOKO_PASSWORD_HASH_POOL=process``),
spoken to over pipes by the event loop itself, at a lower CPU priority (nice
:data:`soko.identity.hashing.HASH_NICENESS`): when the cores are busy, the scheduler gives them to
request handling first, so a burst of sign-ins slows the sign-ins themselves, not every
other request. A thread pool (``thread``) does the same work inside the process, where a
lower-priority thread must still take the GIL twice a hash and can hold up the event
loop while it waits for a core (:mod:`soko.identity.hashing` says more); it needs no
process to start, so tests and one-off commands use it.

Passwords are NFKC-normalized before they are checked, hashed or verified, so the same
password typed on two keyboards that compose characters differently still matches
(SP 800-63B 5.1.1.2). The policy counts length in code points of that normalized form,
imposes no composition rules, and refuses common or breached passwords from a bundled
list and the account's own email, phone or name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import importlib.resources
import itertools
import json
import os
import re
import secrets
import sys
import unicodedata
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import phonenumbers
import structlog
from pwdlib import PasswordHash
from pwdlib.exceptions import UnknownHashError

from soko.identity.errors import WeakPassword
from soko.identity.hashing import HASH_NICENESS, lower_priority, password_hash
from soko.platform.admission import working_elsewhere
from soko.platform.config import Settings

if TYPE_CHECKING:
    from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.identity.passwords")

T = TypeVar("T")

BLOCKLIST_RESOURCE = "data/common-passwords.txt.gz"

# Hashing cost grows with length (Argon2 pre-hashes the input, so only a little), and no
# person types more than this; SP 800-63B asks for at least 64.
MAX_PASSWORD_LENGTH = 256
# For the OpenAPI description of a new password's field, which takes longer text so that
# the policy can say what is wrong with it.
NEW_PASSWORD_DESCRIPTION = (
    f"The password policy takes {MAX_PASSWORD_LENGTH} characters at most (and at least "
    "SOKO_PASSWORD_MIN_LENGTH, 10 by default); a longer one is answered 422 weak-password"
)


def normalize_password(password: str) -> str:
    """The form a password is checked, hashed and verified in (NFKC)."""
    return unicodedata.normalize("NFKC", password)


# -- hashing ----------------------------------------------------------------------------


class HashWorkerFailed(RuntimeError):
    """A hashing worker process stopped or never started; the request fails (500)."""


class _ThreadHashing:
    """Hashing in a thread pool of this process, at a lower priority (see the module's
    notes): no process to start, used by tests and the command line."""

    def __init__(self, hasher: PasswordHash, *, threads: int) -> None:
        self._hash = hasher
        self._executor = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix="soko-password",
            initializer=functools.partial(lower_priority, HASH_NICENESS),
        )

    async def _run(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        # The hash is computed off the event loop: the request's place goes to another
        # request meanwhile (see _ProcessHashing._request).
        async with working_elsewhere():
            return await loop.run_in_executor(self._executor, work)

    async def hash(self, password: str) -> str:
        return await self._run(lambda: self._hash.hash(password))

    async def verify(self, password: str, stored_hash: str) -> bool:
        return await self._run(lambda: bool(self._hash.verify(password, stored_hash)))

    async def verify_and_update(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        return await self._run(lambda: self._hash.verify_and_update(password, stored_hash))

    async def start(self) -> None:
        """Threads start on first use; nothing to do."""

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    async def aclose(self) -> None:
        self.close()


# The worker imports soko.identity.hashing from wherever this process found soko.
_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(eq=False)
class _HashWorker:
    process: asyncio.subprocess.Process

    @property
    def pipes(self) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        return stdin, stdout

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, RuntimeError):
                self.process.kill()


class _ProcessHashing:
    """Hashing in up to ``processes`` worker processes (``python -m
    soko.identity.hashing``), each one request at a time, spoken to over pipes by the
    event loop itself: the API process gets no extra thread and never shares its GIL
    with hashing.

    Workers start on first use, or all at once with :meth:`start` (the server does at
    startup), and are reused. A worker that dies (killed, out of
    memory) is replaced and the request tried once more on a new one. A caller that
    goes away mid-request leaves the exchange to finish, so no answer is ever read by
    the wrong request. Pipes belong to an event loop: used from another loop, the pool
    starts new workers."""

    def __init__(
        self, *, processes: int, memory_kib: int, iterations: int, parallelism: int
    ) -> None:
        self._size = processes
        self._argv = [
            sys.executable,
            "-m",
            "soko.identity.hashing",
            str(memory_kib),
            str(iterations),
            str(parallelism),
            str(HASH_NICENESS),
        ]
        self._idle: list[_HashWorker] = []
        self._workers: set[_HashWorker] = set()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _bound_slots(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._slots is None:
            for worker in list(self._workers):
                self._discard(worker)
            self._loop = loop
            self._slots = asyncio.Semaphore(self._size)
        return self._slots

    def _discard(self, worker: _HashWorker) -> None:
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        worker.kill()

    async def _start(self) -> _HashWorker:
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": _ROOT + (os.pathsep + path if path else "")}
        process = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        worker = _HashWorker(process)
        self._workers.add(worker)
        try:
            ready = await worker.pipes[1].readline()
        except BaseException:
            self._discard(worker)
            raise
        if ready != b'{"ready": true}\n':
            self._discard(worker)
            raise HashWorkerFailed("the password hashing worker did not start")
        return worker

    async def start(self) -> None:
        """Start every worker now rather than on first use, so the first sign-ins wait
        for none, and a worker that cannot start stops the server's start."""
        self._bound_slots()
        while len(self._workers) < self._size:
            self._idle.append(await self._start())

    async def _exchange(self, payload: bytes) -> dict[str, Any]:
        for attempt in (1, 2):
            worker = self._idle.pop() if self._idle else await self._start()
            stdin, stdout = worker.pipes
            try:
                stdin.write(payload)
                await stdin.drain()
                line = await stdout.readline()
            except (OSError, ConnectionError):
                line = b""
            except BaseException:  # cancelled mid-request: its answer must not be reused
                self._discard(worker)
                raise
            if line.endswith(b"\n"):
                self._idle.append(worker)
                answer: dict[str, Any] = json.loads(line)
                return answer
            self._discard(worker)
            log.warning(
                "password_worker_lost", attempt=attempt, returncode=worker.process.returncode
            )
        raise HashWorkerFailed("the password hashing worker stopped twice in a row")

    async def _request(self, request: dict[str, Any]) -> Any:
        if self._closed:
            raise HashWorkerFailed("the password hasher is closed")
        slots = self._bound_slots()
        payload = json.dumps(request).encode("ascii") + b"\n"
        # Waiting for a worker and its hash is work done elsewhere: the request gives its
        # place to another meanwhile (soko.platform.admission). Holding it, a burst of
        # sign-ins queued on the workers filled every place, and a GET /me waited behind
        # them for the hashes of the whole burst.
        async with working_elsewhere():
            await slots.acquire()
            exchange = asyncio.ensure_future(self._exchange(payload))

            def done(task: asyncio.Future[dict[str, Any]]) -> None:
                slots.release()
                if not task.cancelled():
                    task.exception()  # retrieved: a caller gone away is not an unhandled error

            exchange.add_done_callback(done)
            answer = await asyncio.shield(exchange)
        error = answer.get("error")
        if error == "unknown_hash":
            raise UnknownHashError("no hasher reads this hash")
        if error is not None:
            raise HashWorkerFailed(f"password hashing failed: {answer.get('kind')}")
        return answer["result"]

    async def hash(self, password: str) -> str:
        return str(await self._request({"op": "hash", "password": password}))

    async def verify(self, password: str, stored_hash: str) -> bool:
        request = {"op": "verify", "password": password, "hash": stored_hash}
        return bool(await self._request(request))

    async def verify_and_update(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        request = {"op": "verify_and_update", "password": password, "hash": stored_hash}
        ok, new_hash = await self._request(request)
        return bool(ok), new_hash

    def close(self) -> None:
        """Ask every worker to stop: each sees its input close and exits after the hash
        it is computing."""
        self._closed = True
        for worker in list(self._workers):
            try:
                worker.pipes[0].close()
            except RuntimeError:  # its event loop is already closed
                worker.kill()

    async def aclose(self) -> None:
        """:meth:`close`, then wait (a few seconds at most) for the workers to exit."""
        self.close()
        workers, self._workers, self._idle = list(self._workers), set(), []
        for worker in workers:
            try:
                await asyncio.wait_for(worker.process.wait(), timeout=5)
            except (TimeoutError, RuntimeError):
                worker.kill()


class PasswordHasher:
    """Argon2id hashing and verification off the event loop: in worker processes
    (``pool="process"``, the default for serving) or in a thread pool
    (``pool="thread"``), at most ``threads`` at once either way.

    ``verify`` rehashes transparently: when the stored hash was made with other
    parameters (or another Argon2 variant), a correct password also yields a new hash
    for the caller to store.
    """

    def __init__(
        self,
        *,
        memory_kib: int,
        iterations: int,
        parallelism: int,
        threads: int,
        pool: str = "thread",
    ) -> None:
        self.memory_kib = memory_kib
        self.iterations = iterations
        self.parallelism = parallelism
        self.pool = pool
        self._hash = password_hash(
            memory_kib=memory_kib, iterations=iterations, parallelism=parallelism
        )
        self._backend: _ThreadHashing | _ProcessHashing
        if pool == "process":
            self._backend = _ProcessHashing(
                processes=threads,
                memory_kib=memory_kib,
                iterations=iterations,
                parallelism=parallelism,
            )
        elif pool == "thread":
            self._backend = _ThreadHashing(self._hash, threads=threads)
        else:
            raise ValueError(f"unknown password hashing pool {pool!r}")
        self._dummy_hash: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PasswordHasher:
        return cls(
            memory_kib=settings.password_hash_memory_kib,
            iterations=settings.password_hash_iterations,
            parallelism=settings.password_hash_parallelism,
            threads=settings.password_hash_threads,
            pool=settings.password_hash_pool,
        )

    async def start(self) -> None:
        """Start the worker processes now (a thread pool needs nothing): the server does
        this at startup."""
        await self._backend.start()

    async def hash(self, password: str) -> str:
        """The Argon2id hash of ``password`` (normalized) with the current parameters."""
        return await self._backend.hash(normalize_password(password))

    async def verify(self, password: str, stored_hash: str | None) -> tuple[bool, str | None]:
        """Whether ``password`` matches ``stored_hash``, and a new hash to store when the
        stored one was made with other parameters (``None`` otherwise).

        ``stored_hash`` may be ``None`` (an unknown account, or one without a password):
        the answer is then ``(False, None)`` after as much work as a real verification,
        so a caller can pass ``user.password_hash if user else None`` and answer in the
        same time either way."""
        if stored_hash is None:
            await self.dummy_verify()
            return False, None
        normalized = normalize_password(password)
        try:
            return await self._backend.verify_and_update(normalized, stored_hash)
        except UnknownHashError:
            log.warning("password_hash_unreadable")
            await self.dummy_verify()
            return False, None

    async def dummy_verify(self) -> None:
        """Spend the time of one verification, for an account that does not exist."""
        if self._dummy_hash is None:
            # Two first calls at once both make one; either will do.
            self._dummy_hash = await self.hash(secrets.token_urlsafe(24))
        await self._backend.verify(secrets.token_urlsafe(24), self._dummy_hash)

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` was made with other parameters than the current ones."""
        try:
            return self._hash.current_hasher.check_needs_rehash(stored_hash)
        except ValueError:  # argon2's InvalidHashError: not a hash we can read at all
            return True

    def close(self) -> None:
        """Stop the threads or worker processes once the hashes already started are
        done."""
        self._backend.close()

    async def aclose(self) -> None:
        """:meth:`close`, and wait for worker processes to exit."""
        await self._backend.aclose()


_hashers: weakref.WeakKeyDictionary[Runtime, PasswordHasher] = weakref.WeakKeyDictionary()


def password_hasher(runtime: Runtime) -> PasswordHasher:
    """The runtime's one :class:`PasswordHasher`, made on first use from its settings.

    It lives as long as the runtime; its idle threads end when both are collected (or at
    once with :meth:`PasswordHasher.close`)."""
    hasher = _hashers.get(runtime)
    if hasher is None:
        hasher = PasswordHasher.from_settings(runtime.settings)
        _hashers[runtime] = hasher
        runtime.on_stop(hasher.aclose)
    return hasher


# -- policy -----------------------------------------------------------------------------


@functools.cache
def common_passwords() -> frozenset[str]:
    """The bundled list of common and breached passwords, in lower case."""
    resource = importlib.resources.files("soko.identity").joinpath(BLOCKLIST_RESOURCE)
    text = gzip.decompress(resource.read_bytes()).decode("utf-8")
    return frozenset(line for line in text.splitlines() if line)


def _squashed(value: str) -> str:
    """``value`` case-folded with everything but letters and digits removed, so
    ``Jane Doe`` and ``jane.doe`` compare equal."""
    return "".join(ch for ch in normalize_password(value).casefold() if ch.isalnum())


def _phone_forms(phone: str) -> set[str]:
    """The digit strings a person might type for their own number: international,
    national with and without its trunk prefix."""
    forms = {re.sub(r"\D", "", phone)}
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return forms - {""}
    national = str(number.national_number)
    forms |= {national, "0" + national}
    national_format = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    forms.add(re.sub(r"\D", "", national_format))
    return forms - {""}


def _is_repetitive(password: str) -> bool:
    if len(set(password)) < 3:
        return True
    # "abcabcabca": one short unit over and over.
    return any(
        (password[:unit] * (len(password) // unit + 1)).startswith(password)
        for unit in range(1, min(5, len(password)))
    )


def _is_sequential(password: str) -> bool:
    """One run of consecutive letters or digits, up or down ("abcdefghij", "9876543210")."""
    folded = password.casefold()
    if not folded.isascii() or not folded.isalnum():
        return False
    steps = {ord(b) - ord(a) for a, b in itertools.pairwise(folded)}
    return steps in ({1}, {-1})


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    """Which passwords Soko accepts, after NIST SP 800-63B 5.1.1.2."""

    min_length: int = 10
    max_length: int = MAX_PASSWORD_LENGTH

    @classmethod
    def from_settings(cls, settings: Settings) -> PasswordPolicy:
        return cls(min_length=settings.password_min_length)

    def problems(
        self,
        password: str,
        *,
        email: str | None = None,
        phone: str | None = None,
        display_name: str | None = None,
    ) -> list[tuple[str, str]]:
        """Every reason to refuse ``password``, as ``(code, sentence)`` pairs; empty
        when it is accepted."""
        normalized = normalize_password(password)
        length = len(normalized)
        found: list[tuple[str, str]] = []
        if length < self.min_length:
            found.append(
                ("too_short", f"Use at least {self.min_length} characters (this has {length}).")
            )
        if length > self.max_length:
            found.append(
                ("too_long", f"Use at most {self.max_length} characters (this has {length}).")
            )
            # The checks below would only repeat work on text nobody could remember.
            return found
        if normalized.casefold() in common_passwords():
            found.append(
                ("common", "This password is among the most common or breached passwords.")
            )
        elif _is_repetitive(normalized) or _is_sequential(normalized):
            found.append(("predictable", "Repeated or sequential characters are easy to guess."))
        if self._matches_account(normalized, email=email, phone=phone, display_name=display_name):
            found.append(
                ("matches_account", "Do not use your email, phone number or name as a password.")
            )
        return found

    @staticmethod
    def _matches_account(
        password: str, *, email: str | None, phone: str | None, display_name: str | None
    ) -> bool:
        squashed = _squashed(password)
        if not squashed:
            return False
        words: set[str] = set()
        if email:
            words.add(_squashed(email))
            words.add(_squashed(email.rpartition("@")[0]))
        if display_name:
            words.add(_squashed(display_name))
        if phone:
            words |= _phone_forms(phone)
        return squashed in words - {""}

    def check(
        self,
        password: str,
        *,
        email: str | None = None,
        phone: str | None = None,
        display_name: str | None = None,
    ) -> None:
        """Raise :class:`WeakPassword` with a ``reasons`` list of codes (``too_short``,
        ``too_long``, ``common``, ``predictable``, ``matches_account``) when ``password``
        is refused."""
        found = self.problems(password, email=email, phone=phone, display_name=display_name)
        if found:
            raise WeakPassword(
                " ".join(sentence for _, sentence in found),
                reasons=[code for code, _ in found],
                min_length=self.min_length,
                max_length=self.max_length,
            )
