"""Several API processes, each with a listening socket of its own (``SO_REUSEPORT``).

uvicorn's workers all accept from the one socket their supervisor bound. Whichever
process is awake first takes a new connection, so a burst of keep-alive connections (a
load balancer's pool, a benchmark's clients) lands mostly on one process: measured on
2 cores with 2 processes, the catalog page was served by one process at one core while
the other idled. With ``SO_REUSEPORT`` each worker listens on a socket of its own bound
to the same address, and the kernel spreads new connections across them by a hash of
the connection's addresses.

The supervisor still binds its socket first (so a port in use stops the start, and port
0 picks the port every worker then binds), but never listens on it: only listening
sockets take part in the kernel's choice. Each worker binds its twin and closes its copy
of the supervisor's. Everything else is uvicorn's ``Multiprocess``: health checks (with
a longer grace for a worker's first answer), replacing a dead worker, draining on
SIGTERM.

Each process also sends every response with one write (:class:`CoalescingTransport`):
uvicorn writes a response's head and body apart, two system calls and two packets.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import sys
import time
from collections.abc import Iterable
from typing import Any

from uvicorn import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import multiprocess

logger = logging.getLogger("uvicorn.error")


def socket_per_worker_supported() -> bool:
    """Whether this system spreads connections across sockets sharing a port (Linux
    since 3.9; other systems with ``SO_REUSEPORT`` only let them share it)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _reuse_port_socket(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family=family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class ReusePortConfig(Config):
    """uvicorn's configuration, binding its TCP socket with ``SO_REUSEPORT``."""

    def bind_socket(self) -> socket.socket:
        if self.uds or self.fd is not None:
            return super().bind_socket()
        family = socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET
        try:
            sock = _reuse_port_socket(family, (self.host, self.port))
        except OSError as exc:
            logger.error(exc)
            sys.exit(3)  # uvicorn's STARTUP_FAILURE
        bound = sock.getsockname()
        logger.info(
            "Uvicorn running on http://%s:%d with a socket per worker (Press CTRL+C to quit)",
            bound[0],
            bound[1],
        )
        sock.set_inheritable(True)
        return sock


# How long a new worker may take to answer its first health check. It imports Soko before
# it can answer (1.5 s on an idle 2-core VM, over 4 s on a busy one), and uvicorn's check,
# meant for a worker that hangs while serving, gives every answer 5 s: on a busy machine it
# killed workers as they started, and their replacements the same way.
STARTUP_GRACE_SECONDS = 60.0


class ReusePortProcess(multiprocess.Process):
    """A uvicorn worker that serves on a twin of the supervisor's socket, and is given
    :data:`STARTUP_GRACE_SECONDS` to answer its first health check."""

    _started_at = 0.0
    _asked = False
    _answered = False

    def start(self) -> None:
        self._started_at = time.monotonic()
        super().start()

    def wait_until_ready(self, timeout: float, should_exit: Any = None) -> bool:
        # A replacement started by a reload (SIGHUP) imports Soko too: it gets the same
        # grace, and the worker it replaces keeps serving meanwhile.
        return super().wait_until_ready(max(timeout, STARTUP_GRACE_SECONDS), should_exit)

    def is_alive(self, timeout: float = 5) -> bool:
        if self._answered:
            return super().is_alive(timeout)
        # Until its first answer the worker is alive while its process runs and the grace
        # lasts. Its answer is looked for without waiting: the supervisor checks every
        # worker in turn, and handles signals, between these calls.
        if not self.process.is_alive():
            return False
        try:
            if not self._asked:
                self.parent_conn.send(b"ping")
                self._asked = True
            if self.parent_conn.poll(0):
                self.parent_conn.recv()
                self._answered = True
                return True
        except (OSError, EOFError, pickle.UnpicklingError):
            return False
        return time.monotonic() - self._started_at < STARTUP_GRACE_SECONDS

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        # Runs in the worker process (covered by the serve tests, through a subprocess).
        own = []
        for inherited in sockets or []:
            if inherited.family in (socket.AF_INET, socket.AF_INET6):
                own.append(_reuse_port_socket(inherited.family, inherited.getsockname()[:2]))
                inherited.close()
            else:
                own.append(inherited)
        super().target(own)


def run_workers(config: ReusePortConfig) -> None:
    """Serve ``config.workers`` processes, each listening on its own socket."""
    # uvicorn's supervisor makes (and remakes) each worker from this module attribute.
    multiprocess.Process = ReusePortProcess  # type: ignore[misc]
    sock = config.bind_socket()
    try:
        multiprocess.Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()


# -- one write a response ---------------------------------------------------------------------

# Writes up to this size wait for the end of the loop's turn; a larger one (a big body,
# a stream) goes out at once, behind what waited, so the transport's own buffer and flow
# control see it as before and no connection holds more than this in the wrapper.
COALESCE_MAX_BYTES = 64 * 1024


class CoalescingTransport:
    """A transport whose small writes within one turn of the event loop leave as one.

    uvicorn writes a response's head and its body with a write each, and uvloop sends
    each at once: two system calls, and two packets the client wakes up for, though the
    body follows the head in the same turn of the loop. This wrapper keeps the writes of
    a turn and sends them together at its end (``loop.call_soon``), before a write of
    more than :data:`COALESCE_MAX_BYTES`, and before the transport closes or ends its
    side. Everything else is the wrapped transport's."""

    __slots__ = ("_loop", "_pending", "_pending_bytes", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        if self._pending_bytes + size > COALESCE_MAX_BYTES:
            self.flush()
            self._transport.write(data)
            return
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(bytes(data))
        self._pending_bytes += size

    def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what waits now (nothing once the transport is closing)."""
        pending, self._pending, self._pending_bytes = self._pending, None, 0
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, sending each response in one system call (its head
    and a body of up to :data:`COALESCE_MAX_BYTES` together)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
