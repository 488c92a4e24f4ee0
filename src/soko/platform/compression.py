"""Compressed copies of cacheable answers, made once per content.

A public read served from the cache (a catalog page, a product page) is the same bytes
for every client, yet ``GZipMiddleware`` compresses it anew for each one that accepts
gzip, which every browser and mobile HTTP library does: at level 6 a 20-product page
costs 0.3 ms to compress, about as much as serving it from the cache, and a
100-product page 1.7 ms. :func:`gzipped` keeps the compressed copy of each answer it
was asked for, keyed by the answer's strong ETag (a hash of its bytes) and length, so a
page is compressed once per content and process; the middleware passes an answer that
already carries ``Content-Encoding`` through untouched.

The copies live in a bounded least-recently-used map (:data:`MEMO_MAX_BYTES` of
compressed bytes a process). A body of :data:`THREAD_MIN_BYTES` or more is compressed
in a worker thread, as the middleware does, so the event loop is not held meanwhile.
"""

from __future__ import annotations

import gzip
from collections import OrderedDict

import anyio.to_thread
from starlette.requests import Request

MEMO_MAX_BYTES = 8 * 1024 * 1024
# As Starlette's GZipMiddleware: bodies this large are compressed off the event loop.
THREAD_MIN_BYTES = 128 * 1024


def accepts_gzip(request: Request) -> bool:
    """Whether the client takes gzip, by the test ``GZipMiddleware`` applies."""
    return "gzip" in request.headers.get("accept-encoding", "")


def _compress(body: bytes, level: int) -> bytes:
    # mtime 0: the same body always compresses to the same bytes.
    return gzip.compress(body, compresslevel=level, mtime=0)


class GzipMemo:
    """Compressed copies by (ETag, length, level), least recently used dropped first."""

    def __init__(self, max_bytes: int = MEMO_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._copies: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()

    async def gzipped(self, etag: str, body: bytes, level: int) -> bytes:
        """``body`` compressed at ``level``; ``etag`` must be a strong tag of ``body``'s
        bytes (``etag_for_content``)."""
        key = (etag, len(body), level)
        copy = self._copies.get(key)
        if copy is not None:
            self._copies.move_to_end(key)
            return copy
        if len(body) >= THREAD_MIN_BYTES:
            copy = await anyio.to_thread.run_sync(_compress, body, level)
        else:
            copy = _compress(body, level)
        if key not in self._copies and len(copy) <= self.max_bytes:
            self._copies[key] = copy
            self.size += len(copy)
            while self.size > self.max_bytes:
                _, dropped = self._copies.popitem(last=False)
                self.size -= len(dropped)
        return copy

    def __len__(self) -> int:
        return len(self._copies)


_MEMO = GzipMemo()


async def gzipped(etag: str, body: bytes, level: int) -> bytes:
    """``body`` compressed at ``level``, from this process's copies when it was before."""
    return await _MEMO.gzipped(etag, body, level)
