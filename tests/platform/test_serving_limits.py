"""Limits on a request's head, in the server's protocol: its URL, its header fields, the
bytes it may take and the time it may take. Each refusal is an RFC 9457 problem, and the
connection closes after it.

A real uvicorn server (the protocol ``soko serve`` runs) in a thread, on a free loopback
port, spoken to over raw sockets. Waits are bounded; nothing is asserted about timings.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from soko.platform import serving
from soko.platform.serving import MAX_HEADER_BYTES, MAX_URL_BYTES, CoalescingHttpToolsProtocol

WAIT = 10.0  # the bound on any one wait for the server; never reached when all is well


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    if scope["path"] != "/health":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body = json.dumps({"status": "ok", "headers": len(scope["headers"])}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def port() -> Iterator[int]:
    # The server is handed a socket already bound: a port found free, then bound by the
    # server later, may be taken meanwhile by another test worker's connection.
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    free: int = listening.getsockname()[1]
    config = uvicorn.Config(_app, http=CoalescingHttpToolsProtocol, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(  # no signal handlers off the main thread
        target=server.run, kwargs={"sockets": [listening]}, daemon=True
    )
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield free
    finally:
        server.should_exit = True
        thread.join(WAIT)
        listening.close()


@contextlib.contextmanager
def _connection(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        yield sock


def _head(target: str = "/health", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers or [("Host", "soko")]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` responses, however they arrive (pipelined ones may come in one read):
    each one's status, header fields (lower-cased names) and body."""
    data, responses = b"", []
    while len(responses) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before a response's head: {data!r}"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(data) < length:
            chunk = sock.recv(65536)
            assert chunk, "closed within a response's body"
            data += chunk
        body, data = data[:length], data[length:]
        responses.append((int(status_line.split()[1]), headers, body))
    assert not data, "more responses than expected"
    return responses


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    return _read_responses(sock, 1)[0]


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (waiting at most ``WAIT``)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _assert_problem(sock: socket.socket, status: int, slug: str) -> dict[str, Any]:
    got, headers, body = _read_response(sock)
    assert got == status, body
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    problem: dict[str, Any] = json.loads(body)
    assert problem["type"] == f"/problems/{slug}"
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    # Answered before any application ran, it still has an id to look it up by, and the
    # headers every API answer carries.
    assert len(problem["request_id"]) == 32
    assert headers["x-request-id"] == problem["request_id"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"
    assert "default-src 'none'" in headers["content-security-policy"]
    assert _closed(sock)
    return problem


def _assert_served(sock: socket.socket, headers: int = 1) -> None:
    _assert_ok(_read_response(sock), headers)


def _assert_ok(response: tuple[int, dict[str, str], bytes], headers: int = 1) -> None:
    status, _, body = response
    assert status == 200, body
    assert json.loads(body) == {"status": "ok", "headers": headers}


# -- size --------------------------------------------------------------------------------------


def test_a_url_up_to_the_limit_is_served_and_a_longer_one_is_refused(port: int) -> None:
    longest = "/health?q=" + "a" * (MAX_URL_BYTES - len("/health?q="))
    assert len(longest) == MAX_URL_BYTES
    with _connection(port) as sock:
        sock.sendall(_head(longest))
        _assert_served(sock)
    with _connection(port) as sock:
        sock.sendall(_head(longest + "a"))
        problem = _assert_problem(sock, 414, "uri-too-long")
        assert str(MAX_URL_BYTES) in problem["detail"]


def _headers_of(total: int) -> list[tuple[str, str]]:
    """Header fields whose names and values add up to ``total`` bytes, Host first."""
    headers = [("Host", "soko")]
    left = total - len("Host") - len("soko")
    number = 0
    while left:
        name = f"X-Pad-{number:03d}"
        value = "v" * min(8000, left - len(name))
        headers.append((name, value))
        left -= len(name) + len(value)
        number += 1
    return headers


def test_header_fields_up_to_the_limit_are_served_and_more_are_refused(port: int) -> None:
    most = _headers_of(MAX_HEADER_BYTES)
    assert sum(len(name) + len(value) for name, value in most) == MAX_HEADER_BYTES
    with _connection(port) as sock:
        sock.sendall(_head(headers=most))
        _assert_served(sock, headers=len(most))
    too_many = [*most[:-1], (most[-1][0], most[-1][1] + "v")]
    with _connection(port) as sock:
        sock.sendall(_head(headers=too_many))
        problem = _assert_problem(sock, 431, "request-header-fields-too-large")
        assert str(MAX_HEADER_BYTES) in problem["detail"]


def _send_until_refused(sock: socket.socket, data: bytes, piece: int = 16 * 1024) -> None:
    """Send ``data`` in pieces, stopping where the server stops reading."""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        for start in range(0, len(data), piece):
            sock.sendall(data[start : start + piece])


def test_an_endless_header_is_refused_before_it_ends(port: int) -> None:
    # httptools keeps a header until the next one begins: the bytes read are counted.
    endless = b"GET /health HTTP/1.1\r\nHost: soko\r\nX-Endless: " + b"v" * (4 * 1024 * 1024)
    with _connection(port) as sock:
        sender = threading.Thread(target=_send_until_refused, args=(sock, endless))
        sender.start()
        _assert_problem(sock, 431, "request-header-fields-too-large")
        sender.join(WAIT)
        assert not sender.is_alive()


def test_many_short_header_fields_are_refused(port: int) -> None:
    many = [("Host", "soko")] + [(f"X-{n}", "v") for n in range(MAX_HEADER_BYTES // 4)]
    with _connection(port) as sock:
        _send_until_refused(sock, _head(headers=many))
        _assert_problem(sock, 431, "request-header-fields-too-large")


def test_a_malformed_request_is_a_bad_request_problem(port: int) -> None:
    with _connection(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost soko\r\n\r\n")
        _assert_problem(sock, 400, "bad-request")


# -- time --------------------------------------------------------------------------------------


@pytest.fixture
def short_head_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(serving, "HEAD_TIMEOUT_SECONDS", 0.2)
    return 0.2


def test_a_head_not_complete_in_time_is_answered_408(port: int, short_head_timeout: float) -> None:
    with _connection(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: soko\r\n")  # no blank line
        _assert_problem(sock, 408, "request-timeout")


def test_a_connection_that_never_begins_a_request_is_closed_without_an_answer(
    port: int, short_head_timeout: float
) -> None:
    with _connection(port) as sock:
        assert _closed(sock)


def test_a_head_sent_in_pieces_in_time_is_served(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "HEAD_TIMEOUT_SECONDS", WAIT)
    head = _head()
    with _connection(port) as sock:
        for byte in range(len(head)):
            sock.sendall(head[byte : byte + 1])
            time.sleep(0.001)
        _assert_served(sock)


def test_keep_alive_and_pipelining_still_work(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first head's time starts when the connection is accepted: a long one, so a
    # test machine slow to send it cannot turn it into a 408. Every later head's starts
    # with its first byte, after the short time below is set.
    monkeypatch.setattr(serving, "HEAD_TIMEOUT_SECONDS", WAIT)
    with _connection(port) as sock:
        sock.sendall(_head())
        _assert_served(sock)
        short = 0.2
        monkeypatch.setattr(serving, "HEAD_TIMEOUT_SECONDS", short)
        sock.sendall(_head())
        _assert_served(sock)
        # Idle between requests for longer than a head may take: uvicorn's keep-alive
        # timeout (5 s) applies there, not the head's.
        time.sleep(short * 3)
        sock.sendall(_head())
        _assert_served(sock)
        sock.sendall(_head() * 3)
        for response in _read_responses(sock, 3):
            _assert_ok(response)
        # The next head still has its deadline.
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        _assert_problem(sock, 408, "request-timeout")
