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

And each connection has limits on a request's head (:class:`CoalescingHttpToolsProtocol`):
httptools has none, so a client could send an endless head (memory it never gives
back) or a head that never ends (a connection held open for good). A URL over
:data:`MAX_URL_BYTES` is answered ``414``, header fields over :data:`MAX_HEADER_BYTES`
``431``, a head not complete within :data:`HEAD_TIMEOUT_SECONDS` ``408``, and a head the
parser rejects ``400``: each an RFC 9457 problem, after which the connection closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from uvicorn import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors import multiprocess

from soko.platform.errors import (
    PROBLEM_MEDIA_TYPE,
    BadRequest,
    ProblemError,
    RequestHeaderFieldsTooLarge,
    RequestTimeout,
    UriTooLong,
    problem_body,
)
from soko.platform.http import REQUEST_ID_HEADER, SECURITY_HEADERS
from soko.platform.ids import uuid7

logger = logging.getLogger("uvicorn.error")
_refusals = structlog.get_logger("soko.http")

# SecurityHeadersMiddleware's headers (but HSTS, which the application's settings
# decide), for the answers given before any middleware runs.
_REFUSAL_HEADERS = b"".join(
    name.encode() + b": " + value.encode() + b"\r\n" for name, value in SECURITY_HEADERS
)


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


# -- limits on a request's head -----------------------------------------------------------------

# The request target (path and query), counted as httptools hands it over. 8 KiB is what
# nginx accepts in one request line (`large_client_header_buffers 4 8k`), and ample for a
# list's filters and cursor. Over it: 414.
MAX_URL_BYTES = 8 * 1024

# The header fields' names and values together. nginx allows 32 KiB in all (4 x 8 KiB
# buffers), h11 (uvicorn's other parser) 16 KiB for a whole head; 64 KiB leaves room for
# large cookies and tokens behind proxies that add their own headers. Over it: 431.
MAX_HEADER_BYTES = 64 * 1024

# The bytes read while one head is incomplete. httptools keeps a header's name and value
# until the next header begins, so one endless header never reaches the count above: this
# bounds it (a connection holds at most this plus one read). Twice what the two limits
# allow: a head within both reaches it only with some 20,000 header fields (each adds
# ": " and a line end). Over it: 431.
MAX_HEAD_READ_BYTES = 2 * (MAX_URL_BYTES + MAX_HEADER_BYTES)

# How long a request's head may take to arrive, from its first byte (or, for a
# connection's first request, from the connection's opening) to its blank line. A client
# sends a head at once; one that trickles it holds a connection (slowloris). Past it: 408
# for a head begun, and a plain close for a connection that never began one. nginx
# allows 60 s (`client_header_timeout`); 10 s is ample for any client behind a load
# balancer. An idle keep-alive connection between requests is closed by uvicorn's
# `timeout_keep_alive` (5 s by default), as before.
HEAD_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class HeadProblem:
    """A problem answered before any application sees the request (RFC 9457)."""

    problem: type[ProblemError]
    detail: str

    @property
    def status(self) -> int:
        return self.problem.status

    def body(self, request_id: str) -> bytes:
        return json.dumps(
            problem_body(self.problem, detail=self.detail, request_id=request_id),
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()


URI_TOO_LONG = HeadProblem(UriTooLong, f"The request target is longer than {MAX_URL_BYTES} bytes.")
HEADERS_TOO_LARGE = HeadProblem(
    RequestHeaderFieldsTooLarge,
    f"The request's header fields are larger than {MAX_HEADER_BYTES} bytes in all.",
)
REQUEST_TIMEOUT = HeadProblem(RequestTimeout, "The request's head was not complete in time.")
INVALID_REQUEST = HeadProblem(BadRequest, "The request is not valid HTTP/1.1.")


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head over a limit."""


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, sending each response in one system call (its head
    and a body of up to :data:`COALESCE_MAX_BYTES` together), with limits on a request's
    head: its size (:data:`MAX_URL_BYTES`, :data:`MAX_HEADER_BYTES`) and the time it may
    take (:data:`HEAD_TIMEOUT_SECONDS`)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        self._reading_head = False  # a request's head has begun and is not complete
        self._heads = 0  # heads begun on this connection
        self._header_bytes = 0
        self._head_read_bytes = 0
        self._refusal: HeadProblem | None = None
        self._upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        head = self._heads if self._reading_head else None
        super().data_received(data)
        if self._upgraded or self.transport.is_closing():
            return
        # Counted only while one head stays incomplete across reads: the read that began
        # it may end an earlier request (and the read that ends it may carry a body).
        if self._reading_head and self._heads == head:
            self._head_read_bytes += len(data)
            if self._head_read_bytes > MAX_HEAD_READ_BYTES:
                self._answer_problem(HEADERS_TOO_LARGE)
                return
        # Bytes that began no request (blank lines) cancel uvicorn's keep-alive timeout:
        # an idle connection keeps a deadline all the same.
        idle = self.timeout_keep_alive_task is None and not self._responding()
        if idle and self._head_timer is None:
            self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._heads += 1
        self._reading_head = True
        self._header_bytes = 0
        self._head_read_bytes = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._refuse(URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._reading_head:  # not a chunked body's trailer
            self._header_bytes += len(name) + len(value)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(HEADERS_TOO_LARGE)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        self._upgraded = True
        self._cancel_head_timer()
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to whatever the parser rejects (a callback's exception
        # included): the limit refused, or a malformed request.
        self._answer_problem(self._refusal or INVALID_REQUEST)

    def _refuse(self, problem: HeadProblem) -> None:
        # httptools turns the exception into an HttpParserError, which uvicorn answers
        # with send_400_response.
        self._refusal = problem
        raise _HeadRefused(problem.problem.slug)

    def _answer_problem(self, problem: HeadProblem) -> None:
        self._cancel_head_timer()
        # No application saw the request, so it gets its id here: the answer names it,
        # as every other answer does, and so does the log line an operator looks it up by.
        request_id = uuid7().hex
        body = problem.body(request_id)
        content = [STATUS_LINE[problem.status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: " + PROBLEM_MEDIA_TYPE.encode() + b"\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                REQUEST_ID_HEADER.encode() + b": " + request_id.encode() + b"\r\n",
                _REFUSAL_HEADERS,
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
        client = self.client[0] if self.client else None
        _refusals.info(
            "request refused before the application",
            status=problem.status,
            problem=problem.problem.slug,
            request_id=request_id,
            client=client,
        )

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._upgraded:
            return
        if self._responding():
            # A pipelined head waits behind a response still being sent (reading may be
            # paused meanwhile): its time starts again.
            self._arm_head_timer()
        elif self._reading_head:
            self._answer_problem(REQUEST_TIMEOUT)
        else:
            self.transport.close()
