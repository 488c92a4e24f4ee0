"""Each response leaves the server in one write: the coalescing transport under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from soko.platform.serving import (
    COALESCE_MAX_BYTES,
    CoalescingHttpToolsProtocol,
    CoalescingTransport,
)


class RecordingTransport:
    """What a transport was asked to do, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.calls.append(("write", bytes(data)))

    def write_eof(self) -> None:
        self.calls.append(("eof", b""))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5)}.get(name, default)


async def _next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_turn_leave_together_at_its_end() -> None:
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(memoryview(b"ok"))
    assert inner.calls == []
    await _next_turn()
    assert inner.calls == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]

    transport.writelines([b"a", b"b"])
    await _next_turn()
    transport.write(b"c")
    await _next_turn()
    assert inner.calls[1:] == [("write", b"ab"), ("write", b"c")]


async def test_a_large_write_goes_out_at_once_behind_what_waited() -> None:
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())
    big = b"x" * COALESCE_MAX_BYTES
    transport.write(b"head")
    transport.write(big)
    assert inner.calls == [("write", b"head"), ("write", big)]
    transport.write(b"tail")
    await _next_turn()
    assert inner.calls[-1] == ("write", b"tail")
    # Small writes that add up past the limit are sent before the one that would pass it.
    transport.write(b"y" * (COALESCE_MAX_BYTES - 1))
    transport.write(b"zz")
    assert [call[1][:1] for call in inner.calls[-2:]] == [b"y", b"z"]
    assert len(inner.calls) == 5


async def test_closing_or_ending_sends_what_waited_first_and_nothing_after() -> None:
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())
    transport.write(b"last words")
    transport.write_eof()
    transport.write(b"bye")
    transport.close()
    transport.write(b"too late")
    await _next_turn()
    assert inner.calls == [
        ("write", b"last words"),
        ("eof", b""),
        ("write", b"bye"),
        ("close", b""),
    ]
    # Anything else is the wrapped transport's.
    assert transport.get_extra_info("peername") == ("127.0.0.1", 5)


class CountingProtocol(CoalescingHttpToolsProtocol):
    """The server's protocol, counting what reaches the real transport."""

    writes: list[bytes] = []

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        original = transport.write

        def write(data: Any) -> None:
            CountingProtocol.writes.append(bytes(data))
            original(data)

        transport.write = write  # type: ignore[method-assign]
        super().connection_made(transport)


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"s" * 100_000, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    body = b"hello " + scope["path"].encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[int]:
    # The server is handed a socket already bound: a port found free, then bound by the
    # server later, may be taken meanwhile by another test worker's connection.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        port: int = listening.getsockname()[1]
        config = uvicorn.Config(_app, http=CountingProtocol, log_config=None, lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[listening]))
        async with asyncio.timeout(30):
            while not server.started:
                assert not task.done(), "the server did not start"
                await asyncio.sleep(0.01)
        try:
            yield port
        finally:
            server.should_exit = True
            await task


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return head + body
            body += chunk[:-2]
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def test_a_served_response_is_one_write_and_a_stream_arrives_whole() -> None:
    CountingProtocol.writes = []
    async with _serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for path in ("/one", "/two"):  # two requests on one keep-alive connection
                writer.write(f"GET {path} HTTP/1.1\r\nHost: soko\r\n\r\n".encode())
                response = await _read_response(reader)
                assert response.startswith(b"HTTP/1.1 200 OK\r\n")
                assert response.endswith(b"hello " + path.encode())
            assert len(CountingProtocol.writes) == 2
            assert all(write.endswith(b"hello /one") or write.endswith(b"hello /two")
                       for write in CountingProtocol.writes)  # fmt: skip

            writer.write(b"GET /stream HTTP/1.1\r\nHost: soko\r\n\r\n")
            streamed = await _read_response(reader)
            assert streamed.endswith(b"s" * 300_000)
        finally:
            writer.close()
            await writer.wait_closed()
