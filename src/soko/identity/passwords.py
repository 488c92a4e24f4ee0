"""Passwords: Argon2id hashing off the event loop, and the policy of NIST SP 800-63B.

Hashing and verifying cost ten to twenty milliseconds of CPU each (that is their
point), so they run in a small thread pool owned by one :class:`PasswordHasher` per
runtime (:func:`password_hasher`). libsodium computes them (:class:`SodiumArgon2Hasher`,
behind pwdlib) and releases the GIL while it works, so the event loop keeps serving
other requests meanwhile. On Linux those threads also run at a lower CPU
priority (nice :data:`HASH_THREAD_NICENESS`) than the thread serving requests: when the
cores are busy, the scheduler gives them to request handling first, so a burst of
sign-ins slows the sign-ins themselves, not every other request.

Passwords are NFKC-normalized before they are checked, hashed or verified, so the same
password typed on two keyboards that compose characters differently still matches
(SP 800-63B 5.1.1.2). The policy counts length in code points of that normalized form,
imposes no composition rules, and refuses common or breached passwords from a bundled
list and the account's own email, phone or name.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import importlib.resources
import itertools
import os
import re
import secrets
import threading
import unicodedata
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import nacl.exceptions
import nacl.pwhash.argon2id
import phonenumbers
import structlog
from pwdlib import PasswordHash
from pwdlib.exceptions import UnknownHashError
from pwdlib.hashers.argon2 import ARGON2_ENCODED_HASH_REGEX, Argon2Hasher

from soko.identity.errors import WeakPassword
from soko.platform.config import Settings

if TYPE_CHECKING:
    from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.identity.passwords")

T = TypeVar("T")

BLOCKLIST_RESOURCE = "data/common-passwords.txt.gz"

# Hashing cost grows with length (Argon2 pre-hashes the input, so only a little), and no
# person types more than this; SP 800-63B asks for at least 64.
MAX_PASSWORD_LENGTH = 256

# How much lower the hashing threads' priority is than the rest of the process (Linux
# nice values: 0 default, 19 lowest). At 10 the scheduler weighs them about ten times
# lighter, so request handling preempts them; they still get every idle cycle, so
# sign-ins only slow down when something else wants the CPU.
HASH_THREAD_NICENESS = 10


def _lower_thread_priority() -> None:
    """Lower the calling thread's own priority (on Linux, ``setpriority`` on a thread
    id affects that thread only). Lowering one's priority needs no privilege; where the
    call is missing or refused, hashing simply runs at normal priority."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(
            os.PRIO_PROCESS,
            threading.get_native_id(),
            min(19, max(current, 0) + HASH_THREAD_NICENESS),
        )
    except (AttributeError, OSError):  # not Linux, or a sandbox that forbids it
        log.debug("password_threads_priority_unchanged")


class SodiumArgon2Hasher(Argon2Hasher):
    """pwdlib's Argon2 hasher, computing single-lane Argon2id with libsodium.

    libsodium picks the fastest code the CPU has (AVX-512F, AVX2, SSSE3) at run time; on
    machines with AVX-512 it verifies a 19 MiB, t=2 hash in about 10 ms where
    argon2-cffi's portable build takes 17 ms. Both write and read the same PHC string
    (``$argon2id$v=19$m=...,t=...,p=1$salt$hash``, a 16-byte salt and a 32-byte hash), so
    each verifies the other's hashes; libsodium computes only one lane, so a hash with
    ``p`` above 1, another Argon2 variant, or an explicit salt goes to argon2-cffi."""

    def __init__(self, *, time_cost: int, memory_cost: int, parallelism: int) -> None:
        super().__init__(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism)
        self._time_cost = time_cost
        self._memory_bytes = memory_cost * 1024
        self._sodium_hashes = parallelism == 1

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        if not self._sodium_hashes or salt is not None:
            return super().hash(password, salt=salt)
        encoded = password.encode() if isinstance(password, str) else password
        return nacl.pwhash.argon2id.str(
            encoded, opslimit=self._time_cost, memlimit=self._memory_bytes
        ).decode("ascii")

    def verify(self, password: str | bytes, hash: str | bytes) -> bool:
        text = hash.decode("ascii", "replace") if isinstance(hash, bytes) else hash
        match = ARGON2_ENCODED_HASH_REGEX.fullmatch(text)
        if (
            match is None
            or match.group("variant") != "argon2id"
            or match.group("version") != "19"
            or match.group("parallelism") != "1"
        ):
            return super().verify(password, hash)
        encoded = password.encode() if isinstance(password, str) else password
        try:
            return bool(nacl.pwhash.argon2id.verify(text.encode("ascii"), encoded))
        except (nacl.exceptions.InvalidkeyError, UnicodeEncodeError):
            return False


def normalize_password(password: str) -> str:
    """The form a password is checked, hashed and verified in (NFKC)."""
    return unicodedata.normalize("NFKC", password)


# -- hashing ----------------------------------------------------------------------------


class PasswordHasher:
    """Argon2id hashing and verification in a bounded thread pool.

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
    ) -> None:
        self.memory_kib = memory_kib
        self.iterations = iterations
        self.parallelism = parallelism
        self._hash = PasswordHash(
            (
                SodiumArgon2Hasher(
                    time_cost=iterations, memory_cost=memory_kib, parallelism=parallelism
                ),
            )
        )
        self._executor = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix="soko-password",
            initializer=_lower_thread_priority,
        )
        self._dummy_hash: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PasswordHasher:
        return cls(
            memory_kib=settings.password_hash_memory_kib,
            iterations=settings.password_hash_iterations,
            parallelism=settings.password_hash_parallelism,
            threads=settings.password_hash_threads,
        )

    async def _run(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, work)

    async def hash(self, password: str) -> str:
        """The Argon2id hash of ``password`` (normalized) with the current parameters."""
        normalized = normalize_password(password)
        return await self._run(lambda: self._hash.hash(normalized))

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
            return await self._run(lambda: self._hash.verify_and_update(normalized, stored_hash))
        except UnknownHashError:
            log.warning("password_hash_unreadable")
            await self.dummy_verify()
            return False, None

    async def dummy_verify(self) -> None:
        """Spend the time of one verification, for an account that does not exist."""
        if self._dummy_hash is None:
            # Two first calls at once both make one; either will do.
            self._dummy_hash = await self.hash(secrets.token_urlsafe(24))
        dummy_hash = self._dummy_hash
        candidate = secrets.token_urlsafe(24)
        await self._run(lambda: self._hash.verify(candidate, dummy_hash))

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` was made with other parameters than the current ones."""
        try:
            return self._hash.current_hasher.check_needs_rehash(stored_hash)
        except ValueError:  # argon2's InvalidHashError: not a hash we can read at all
            return True

    def close(self) -> None:
        """Stop the pool's threads once the hashes already queued are done."""
        self._executor.shutdown(wait=False)


_hashers: weakref.WeakKeyDictionary[Runtime, PasswordHasher] = weakref.WeakKeyDictionary()


def password_hasher(runtime: Runtime) -> PasswordHasher:
    """The runtime's one :class:`PasswordHasher`, made on first use from its settings.

    It lives as long as the runtime; its idle threads end when both are collected (or at
    once with :meth:`PasswordHasher.close`)."""
    hasher = _hashers.get(runtime)
    if hasher is None:
        hasher = PasswordHasher.from_settings(runtime.settings)
        _hashers[runtime] = hasher
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
