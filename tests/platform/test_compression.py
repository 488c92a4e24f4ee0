"""Compressed copies of cacheable answers: made once per content, bounded, exact."""

from __future__ import annotations

import gzip
import threading
from typing import Any

import pytest
from starlette.requests import Request

from soko.platform import compression
from soko.platform.compression import THREAD_MIN_BYTES, GzipMemo, accepts_gzip
from soko.platform.etag import etag_for_content


def _body(size: int, seed: int = 0) -> bytes:
    text = "".join(f'{{"sku":"SKU-{seed}-{i:06d}","name":"Unga wa ngano"}},' for i in range(size))
    return text.encode()[:size]


@pytest.fixture
def compressions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Each compression done: the body's size and the thread it ran on."""
    done: list[tuple[int, str]] = []
    original = compression._compress

    def counted(body: bytes, level: int) -> bytes:
        done.append((len(body), threading.current_thread().name))
        return original(body, level)

    monkeypatch.setattr(compression, "_compress", counted)
    return done


async def test_a_body_is_compressed_once_per_content_and_level(
    compressions: list[tuple[int, str]],
) -> None:
    memo = GzipMemo()
    body = _body(5000)
    etag = etag_for_content(body)
    first = await memo.gzipped(etag, body, 6)
    assert gzip.decompress(first) == body
    assert await memo.gzipped(etag, body, 6) is first
    assert len(compressions) == 1
    other = _body(5000, seed=1)
    assert gzip.decompress(await memo.gzipped(etag_for_content(other), other, 6)) == other
    assert gzip.decompress(await memo.gzipped(etag, body, 1)) == body
    assert len(compressions) == 3


async def test_the_copies_are_bounded_least_recently_used_first(
    compressions: list[tuple[int, str]],
) -> None:
    bodies = [_body(20_000, seed=seed) for seed in range(4)]
    sizes = [len(gzip.compress(body, mtime=0)) for body in bodies]
    memo = GzipMemo(max_bytes=sizes[0] + sizes[1] + sizes[2] + 10)
    for body in bodies[:3]:
        await memo.gzipped(etag_for_content(body), body, 9)
    await memo.gzipped(etag_for_content(bodies[0]), bodies[0], 9)  # used again: kept
    await memo.gzipped(etag_for_content(bodies[3]), bodies[3], 9)  # evicts bodies[1]
    assert len(memo) == 3 and memo.size <= memo.max_bytes
    compressions.clear()
    await memo.gzipped(etag_for_content(bodies[0]), bodies[0], 9)
    assert compressions == []
    await memo.gzipped(etag_for_content(bodies[1]), bodies[1], 9)
    assert len(compressions) == 1


async def test_a_large_body_is_compressed_off_the_event_loop(
    compressions: list[tuple[int, str]],
) -> None:
    small, large = _body(1000), _body(THREAD_MIN_BYTES)
    for body in (small, large):
        assert gzip.decompress(await GzipMemo().gzipped(etag_for_content(body), body, 6)) == body
    loop_thread = threading.current_thread().name
    assert compressions[0] == (len(small), loop_thread)
    assert compressions[1][0] == len(large) and compressions[1][1] != loop_thread


@pytest.mark.parametrize(
    ("header", "accepted"),
    [(None, False), (b"identity", False), (b"gzip", True), (b"br, gzip;q=0.8", True)],
)
def test_gzip_is_accepted_as_the_middleware_decides(header: bytes | None, accepted: bool) -> None:
    scope: dict[str, Any] = {"type": "http", "headers": []}
    if header is not None:
        scope["headers"].append((b"accept-encoding", header))
    assert accepts_gzip(Request(scope)) is accepted
