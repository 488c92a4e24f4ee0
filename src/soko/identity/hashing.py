"""Argon2id through libsodium behind pwdlib, and the small process that computes it away
from the API process.

This module imports nothing of Soko but its package, so ``python -m
soko.identity.hashing`` starts quickly (about 130 ms, its first hash included). Run that
way, it is a hashing worker: :class:`soko.identity.passwords.PasswordHasher` starts one
per slot of its pool when ``SOKO_PASSWORD_HASH_POOL=process``. It reads one JSON request
a line from stdin and writes one JSON answer a line to stdout, one at a time, until
stdin closes. It runs at a lower CPU priority than the process that started it.

Hashing in a process of its own matters because of the GIL. A hashing *thread* drops the
GIL while libsodium works, but takes it back twice a hash, before and after. It runs at a
lower priority, so when the cores are busy it can be descheduled while it holds the GIL.
The event loop then waits for it. A worker process has a GIL of its own, so its lower
priority only ever delays hashing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import nacl.exceptions
import nacl.pwhash.argon2id
from pwdlib import PasswordHash
from pwdlib.exceptions import UnknownHashError
from pwdlib.hashers.argon2 import ARGON2_ENCODED_HASH_REGEX, Argon2Hasher

# How much lower hashing runs than request handling (Linux nice values: 0 default, 19
# lowest). At 10 the scheduler weighs it about ten times lighter, so request handling
# preempts it; it still gets every idle cycle, so sign-ins only slow down when something
# else wants the CPU.
HASH_NICENESS = 10


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


def password_hash(*, memory_kib: int, iterations: int, parallelism: int) -> PasswordHash:
    """pwdlib's hasher with libsodium's Argon2id at these parameters."""
    return PasswordHash(
        (SodiumArgon2Hasher(time_cost=iterations, memory_cost=memory_kib, parallelism=parallelism),)
    )


def perform(hasher: PasswordHash, request: dict[str, Any]) -> dict[str, Any]:
    """One request of the worker protocol and its answer.

    - ``{"op": "hash", "password": p}`` answers ``{"result": hash}``;
    - ``{"op": "verify", "password": p, "hash": h}`` answers ``{"result": bool}``;
    - ``{"op": "verify_and_update", "password": p, "hash": h}`` answers
      ``{"result": [bool, new_hash_or_null]}``.

    A hash that no hasher reads answers ``{"error": "unknown_hash"}``. Any other failure
    answers ``{"error": "failed", "kind": <exception class>}``. Neither echoes the
    password nor the hash."""
    try:
        op = request["op"]
        password = request["password"]
        if op == "hash":
            return {"result": hasher.hash(password)}
        if op == "verify":
            return {"result": bool(hasher.verify(password, request["hash"]))}
        if op == "verify_and_update":
            ok, new_hash = hasher.verify_and_update(password, request["hash"])
            return {"result": [bool(ok), new_hash]}
        return {"error": "failed", "kind": "UnknownOperation"}
    except UnknownHashError:
        return {"error": "unknown_hash"}
    except Exception as exc:  # answered, so the worker keeps serving the next request
        return {"error": "failed", "kind": type(exc).__name__}


def lower_priority(niceness: int) -> None:
    """Lower the caller's CPU priority by ``niceness``, to at most 19 (needs no
    privilege); where that is refused, it runs at normal priority.

    On Linux a priority belongs to a thread, and ``who=0`` names the calling one: a
    hashing thread lowers only itself, a worker process its one thread."""
    with contextlib.suppress(AttributeError, OSError):
        current = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(19, max(current, 0) + niceness))


def main(argv: list[str]) -> int:
    """``python -m soko.identity.hashing MEMORY_KIB ITERATIONS PARALLELISM [NICENESS]``."""
    memory_kib, iterations, parallelism = (int(value) for value in argv[:3])
    lower_priority(int(argv[3]) if len(argv) > 3 else HASH_NICENESS)
    hasher = password_hash(memory_kib=memory_kib, iterations=iterations, parallelism=parallelism)
    # Warm up: the first hash maps libsodium's code and the memory it reuses.
    hasher.hash("warm-up")
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    answers.write(b'{"ready": true}\n')
    answers.flush()
    for line in requests:
        try:
            request = json.loads(line)
        except ValueError:
            answer: dict[str, Any] = {"error": "failed", "kind": "BadRequest"}
        else:
            answer = (
                perform(hasher, request)
                if isinstance(request, dict)
                else {"error": "failed", "kind": "BadRequest"}
            )
        try:
            answers.write(json.dumps(answer).encode("ascii") + b"\n")
            answers.flush()
        except BrokenPipeError:  # the API process is gone: so is the reason to run
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
