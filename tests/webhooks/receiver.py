"""Real HTTP servers on 127.0.0.1 for the webhooks tests, each in its own thread.

:class:`Receiver` records every request (headers and body) and answers with the status
the test chose (a list consumed in order, then a default); it can also hold requests
unanswered until released, to stand for a receiver that is slow while a worker dies.
:class:`ConnectionCounter` only accepts TCP connections and counts them: the guard's
tests expect it to count zero.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int = 0
    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    answer_body: bytes = b"ok"
    requests: list[Received] = field(default_factory=list)
    hold: threading.Event | None = None  # set: answer; unset: keep the request waiting
    delay: float = 0.0  # seconds each request takes to answer
    in_flight: dict[str, int] = field(default_factory=dict)  # by path, now
    most_in_flight: dict[str, int] = field(default_factory=dict)  # by path, ever
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def next_status(self) -> int:
        with self._lock:
            return self.statuses.pop(0) if self.statuses else self.default_status

    def record(self, item: Received) -> None:
        with self._lock:
            self.requests.append(item)

    def entered(self, path: str) -> None:
        with self._lock:
            self.in_flight[path] = self.in_flight.get(path, 0) + 1
            self.most_in_flight[path] = max(self.most_in_flight.get(path, 0), self.in_flight[path])

    def left(self, path: str) -> None:
        with self._lock:
            self.in_flight[path] -= 1

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver got {len(self.requests)} of {count} requests")
            time.sleep(0.02)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            receiver.record(
                Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            receiver.entered(self.path)
            try:
                if receiver.hold is not None:
                    receiver.hold.wait(60)
                if receiver.delay:
                    time.sleep(receiver.delay)
            finally:
                receiver.left(self.path)
            status = receiver.next_status()
            payload = receiver.answer_body
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            del format, args  # quiet

    return Handler


@contextmanager
def running_receiver(**options: Any) -> Iterator[Receiver]:
    receiver = Receiver(**options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        if receiver.hold is not None:
            receiver.hold.set()
        server.shutdown()
        server.server_close()


@dataclass
class ConnectionCounter:
    port: int = 0
    connections: int = 0


@contextmanager
def counting_listener() -> Iterator[ConnectionCounter]:
    """A TCP listener on 127.0.0.1 that accepts, counts and closes connections."""
    counter = ConnectionCounter()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    counter.port = listener.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            counter.connections += 1
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
