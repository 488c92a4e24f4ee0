from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import APIRouter, FastAPI, Request
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from soko.app import create_app
from soko.platform.clock import ManualClock
from soko.platform.http import (
    _FormNulScanner,
    _JsonNulScanner,
    accepts_json,
    client_ip,
    register_raw_body_prefix,
    route_template,
)
from soko.platform.runtime import Runtime
from tests.conftest import make_settings

LIMIT = 2048


class Note(BaseModel):
    text: str


def test_router() -> APIRouter:
    router = APIRouter()

    @router.post("/test-http/notes")
    async def post_note(note: Note) -> dict[str, int]:
        return {"length": len(note.text)}

    @router.post("/test-http/raw")
    async def post_raw(request: Request) -> dict[str, int]:
        return {"length": len(await request.body())}

    @router.post("/test-http/signed/{sender}")
    async def post_signed(sender: str, request: Request) -> dict[str, int]:
        return {"length": len(await request.body())}

    @router.get("/test-http/lookup/{key}")
    async def lookup(key: str, q: str = "") -> dict[str, str]:
        return {"key": key, "q": q}

    @router.post("/test-http/form")
    async def post_form(request: Request) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl((await request.body()).decode()))

    @router.get("/test-http/catalog")
    async def catalog(count: int = 200) -> dict[str, Any]:
        return {
            "items": [{"sku": f"SKU-{i:05d}", "name": "Unga wa ngano 2kg"} for i in range(count)]
        }

    return router


test_router.__test__ = False  # type: ignore[attr-defined]

AppFactory = Callable[..., Awaitable[httpx2.AsyncClient]]


@pytest.fixture
async def make_client(
    tmp_path: Path, database_url: str, clock: ManualClock
) -> AsyncIterator[AppFactory]:
    """Clients over apps built with settings overrides (the test router included)."""
    opened: list[tuple[Runtime, httpx2.AsyncClient]] = []

    async def make(**overrides: Any) -> httpx2.AsyncClient:
        settings = make_settings(tmp_path, database_url=database_url, **overrides)
        runtime = Runtime(settings, clock=clock)
        app = create_app(runtime=runtime)
        app.include_router(test_router())
        transport = httpx2.ASGITransport(app=app)
        client = httpx2.AsyncClient(transport=transport, base_url="http://testserver")
        opened.append((runtime, client))
        return client

    yield make
    for runtime, client in opened:
        await client.aclose()
        await runtime.stop()


async def raw_request(
    app: FastAPI,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body_chunks: list[bytes] = (),  # type: ignore[assignment]
    *,
    hang_up: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """Drive the ASGI app directly, for requests an HTTP client would refuse to send;
    with ``hang_up``, the client disconnects after the chunks, before the body's end."""
    chunks = list(body_chunks) or [b""]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": hang_up or bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST" if body_chunks else "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], response_headers, body


# -- security headers ---------------------------------------------------------------------------


async def test_security_headers_on_api_responses(client: httpx2.AsyncClient) -> None:
    for response in (await client.get("/health"), await client.get("/no/such/thing")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert "strict-transport-security" not in response.headers


async def test_pages_get_the_security_headers_and_a_csp_of_their_own(
    client: httpx2.AsyncClient,
) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "script-src 'self'" in docs.headers["content-security-policy"]
    assert docs.headers["x-content-type-options"] == "nosniff"
    assert docs.headers["x-frame-options"] == "DENY"
    # A problem's page loads nothing: the API's policy fits it.
    page = await client.get("/problems/not-found")
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["x-content-type-options"] == "nosniff"


async def test_hsts_only_in_production(make_client: AppFactory) -> None:
    production = await make_client(env="production")
    response = await production.get("/health")
    assert response.headers["strict-transport-security"].startswith("max-age=")
    assert "includeSubDomains" in response.headers["strict-transport-security"]

    development = await make_client(env="development")
    assert "strict-transport-security" not in (await development.get("/health")).headers


# -- request ids ------------------------------------------------------------------------------


async def test_well_formed_request_id_is_echoed(client: httpx2.AsyncClient) -> None:
    for request_id in ("abc-123", "5f0c7a3e-0d6e-4a8e-9c1a-3b2f1e0d9c8b", "edge:1.2_3", "x" * 128):
        response = await client.get("/health", headers={"X-Request-ID": request_id})
        assert response.headers["x-request-id"] == request_id


async def test_generated_request_ids_are_unique(client: httpx2.AsyncClient) -> None:
    ids = {(await client.get("/health")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5
    assert all(len(value) == 32 for value in ids)


@pytest.mark.parametrize(
    "bad",
    [
        b"x" * 200,
        b"x" * 129,
        b"has space",
        b"line\nbreak",
        b"line\r\nX-Injected: 1",
        b"",
        b"semi;colon",
        b"caf\xc3\xa9",
    ],
)
async def test_malformed_request_id_is_replaced(app: FastAPI, bad: bytes) -> None:
    status, headers, body = await raw_request(app, "/no/such/thing", [(b"x-request-id", bad)])
    assert status == 404
    assert headers["x-request-id"] != bad.decode("latin-1")
    assert len(headers["x-request-id"]) == 32
    assert "x-injected" not in headers
    assert json.loads(body)["request_id"] == headers["x-request-id"]


# -- body size limit ----------------------------------------------------------------------------


async def test_declared_body_over_the_limit_is_413(make_client: AppFactory) -> None:
    client = await make_client(max_body_bytes=LIMIT)
    response = await client.post(
        "/test-http/notes",
        json={"text": "x" * (LIMIT + 10)},
        headers={"X-Request-ID": "too-big-1"},
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/payload-too-large"
    assert problem["status"] == 413
    assert problem["request_id"] == "too-big-1"
    assert response.headers["x-request-id"] == "too-big-1"


async def test_body_at_the_limit_is_accepted(make_client: AppFactory) -> None:
    client = await make_client(max_body_bytes=LIMIT)
    text = "x" * (LIMIT - len('{"text":""}'))
    response = await client.post(
        "/test-http/notes",
        content=json.dumps({"text": text}, separators=(",", ":")),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert response.json() == {"length": len(text)}


@pytest.mark.parametrize("path", ["/test-http/notes", "/test-http/raw"])
async def test_chunked_body_over_the_limit_is_413(make_client: AppFactory, path: str) -> None:
    client = await make_client(max_body_bytes=LIMIT)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}'

    response = await client.post(
        path,
        content=chunks(),
        headers={"Content-Type": "application/json", "X-Request-ID": "chunked-1"},
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/payload-too-large"
    assert problem["request_id"] == "chunked-1"


async def test_chunked_body_under_the_limit_is_read(make_client: AppFactory) -> None:
    client = await make_client(max_body_bytes=LIMIT)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        yield b"x" * 1000
        yield b'"}'

    response = await client.post(
        "/test-http/notes", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert response.json() == {"length": 1000}


async def test_lying_content_length_is_still_counted(make_client: AppFactory) -> None:
    client = await make_client(max_body_bytes=LIMIT)
    app = client._transport.app  # type: ignore[attr-defined]
    status, _, body = await raw_request(
        app,
        "/test-http/raw",
        [(b"content-length", b"10"), (b"content-type", b"application/octet-stream")],
        [b"x" * 1500, b"x" * 1500],
    )
    assert status == 413
    assert json.loads(body)["type"] == "/problems/payload-too-large"


# -- the NUL character -------------------------------------------------------------------------


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# Text built from the pieces that make the scanner's work hard: backslashes, the
# letters of an escape, the NUL itself and its neighbours.
_TRICKY_TEXT = st.lists(
    st.sampled_from(["\\", "u", "0", "\x00", "\x01", "a", "é", '"', "\\u0000"]), max_size=40
).map("".join)


@given(
    text=_TRICKY_TEXT,
    ascii_only=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_json_scanner_finds_a_nul_exactly_when_a_string_holds_one(
    text: str, ascii_only: bool, cuts: list[int]
) -> None:
    body = json.dumps({"text": text, text: 1}, ensure_ascii=ascii_only).encode()
    scanner = _JsonNulScanner()
    found = any(scanner.feed(chunk) for chunk in _split(body, cuts) if chunk)
    assert found == ("\x00" in text)


@given(
    text=_TRICKY_TEXT,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_form_scanner_finds_a_nul_exactly_when_a_field_holds_one(
    text: str, cuts: list[int]
) -> None:
    from urllib.parse import urlencode

    body = urlencode({"text": text}).encode()
    scanner = _FormNulScanner()
    found = any(scanner.feed(chunk) for chunk in _split(body, cuts) if chunk)
    assert found == ("\x00" in text)


def test_json_scanner_memory_stays_small_on_a_run_of_backslashes() -> None:
    scanner = _JsonNulScanner()
    for _ in range(100):
        assert not scanner.feed(b"\\" * 1000)
    assert len(scanner._carry) <= 6
    assert scanner.feed(b"u0000") is False  # an even run: the text "u0000"
    scanner = _JsonNulScanner()
    scanner.feed(b"\\" * 999)
    assert scanner.feed(b"u0000") is True  # an odd run: an escape


def _nul_refused(response: httpx2.Response, where: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/validation-error"
    assert problem["status"] == 422
    assert problem["errors"][0]["in"] == where
    assert problem["errors"][0]["code"] == "nul_character"


async def test_a_nul_in_a_json_body_is_422(make_client: AppFactory) -> None:
    client = await make_client()
    response = await client.post("/test-http/notes", json={"text": "Duka\x00"})
    _nul_refused(response, "body")
    # In a key too, and a body with no content type is read as JSON.
    response = await client.post("/test-http/notes", content=b'{"text": "a", "\\u0000": 1}')
    _nul_refused(response, "body")


async def test_an_escaped_backslash_before_u0000_is_text(make_client: AppFactory) -> None:
    client = await make_client()
    response = await client.post("/test-http/notes", json={"text": "C:\\u0000"})
    assert response.status_code == 200
    assert response.json() == {"length": len("C:\\u0000")}


async def test_a_nul_escape_cut_between_chunks_is_422(make_client: AppFactory) -> None:
    client = await make_client()

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "abc\\'
        yield b"u00"
        yield b'00"}'

    response = await client.post(
        "/test-http/notes", content=chunks(), headers={"Content-Type": "application/json"}
    )
    _nul_refused(response, "body")


async def test_a_nul_in_the_path_or_the_query_is_422(make_client: AppFactory) -> None:
    client = await make_client()
    _nul_refused(await client.get("/test-http/lookup/a%00b"), "path")
    _nul_refused(await client.get("/test-http/lookup/a", params={"q": "x\x00"}), "query")
    # Other control characters are text like any other.
    response = await client.get("/test-http/lookup/a%01b", params={"q": "x\x01"})
    assert response.json() == {"key": "a\x01b", "q": "x\x01"}


async def test_a_nul_in_a_form_is_422(make_client: AppFactory) -> None:
    client = await make_client()
    _nul_refused(await client.post("/test-http/form", data={"name": "a\x00b"}), "body")
    response = await client.post("/test-http/form", data={"name": "a%00b"})  # sent as %2500
    assert response.json() == {"name": "a%00b"}


async def test_a_signed_raw_body_is_taken_whole(make_client: AppFactory) -> None:
    register_raw_body_prefix("/test-http/signed/")
    client = await make_client()
    body = b'{"note": "\\u0000"}'
    response = await client.post(
        "/test-http/signed/provider", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.json() == {"length": len(body)}
    # Elsewhere a raw route is guarded like any other.
    response = await client.post(
        "/test-http/raw", content=body, headers={"Content-Type": "application/json"}
    )
    _nul_refused(response, "body")
    with pytest.raises(ValueError):
        register_raw_body_prefix("/no-slash")


# -- Accept ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "admitted"),
    [
        (b"application/json", True),
        (b"Application/JSON; charset=utf-8", True),
        (b"application/problem+json", True),
        (b"text/html, application/xhtml+xml, */*;q=0.8", True),
        (b"text/html,application/*;q=0.1", True),
        (b"application/json;q=nonsense", True),
        (b"", True),
        (b"   ", True),
        (b"text/html", False),
        (b"text/html, application/xml;q=0.9", False),
        (b"application/json;q=0, text/plain", False),
        (b"*/*;q=0.000", False),
        (b"application/vnd.api+json", False),
        (b"nonsense", False),
    ],
)
def test_accepts_json_reads_ranges_and_weights(accept: bytes, admitted: bool) -> None:
    assert accepts_json(accept) is admitted


async def test_an_api_request_accepting_no_json_is_406_and_changes_nothing(
    client: httpx2.AsyncClient,
) -> None:
    refused = await client.post("/api/v1/carts", headers={"Accept": "text/html"})
    assert refused.status_code == 406, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert problem["type"] == "/problems/not-acceptable"
    assert problem["instance"] == "/api/v1/carts"
    assert problem["request_id"] == refused.headers["x-request-id"]
    # Refused before the route runs: a body it would have refused is not even read.
    unread = await client.post(
        "/api/v1/carts",
        content=b"{not json",
        headers={"Accept": "text/html", "Content-Type": "application/json"},
    )
    assert unread.status_code == 406, unread.text
    # Several Accept headers count together; one that admits JSON is enough.
    created = await client.post(
        "/api/v1/carts", headers=[("Accept", "text/html"), ("Accept", "application/json")]
    )
    assert created.status_code == 201, created.text
    assert created.json()["token"].startswith("ct_")
    for accept in ("*/*", "application/json", "application/problem+json"):
        listing = await client.get("/api/v1/products", headers={"Accept": accept})
        assert listing.status_code == 200, (accept, listing.text)
    assert (await client.get("/api/v1/products", headers={"Accept": ""})).status_code == 200


async def test_a_query_parameter_given_twice_is_refused(client: httpx2.AsyncClient) -> None:
    """No API parameter takes several values: one would be used, the others dropped."""
    refused = await client.get("/api/v1/products?q=kanga&limit=5&q=kikoi")
    assert refused.status_code == 422, refused.text
    problem = refused.json()
    assert problem["type"] == "/problems/validation-error"
    assert problem["errors"][0]["in"] == "query"
    assert problem["errors"][0]["field"] == "q"
    assert problem["errors"][0]["code"] == "repeated_parameter"
    assert (await client.get("/api/v1/products?q=kanga&limit=5")).status_code == 200
    # Outside the API (a page, the health check), parameters are the route's business.
    assert (await client.get("/health?x=1&x=2")).status_code == 200


async def test_pages_and_provider_callbacks_are_served_whatever_they_accept(
    client: httpx2.AsyncClient,
) -> None:
    html_only = {"Accept": "text/html"}
    assert (await client.get("/health", headers=html_only)).status_code == 200
    page = await client.get("/verify-email", headers=html_only)  # a link without its token
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
    # A callback answers what it would have answered (here: an unsigned report is 401),
    # never 406.
    for path in (
        "/api/v1/payments/webhooks/sandbox",
        "/api/v1/notifications/callbacks/twilio",
    ):
        answer = await client.post(path, content=b"{}", headers={"Accept": "text/plain"})
        assert answer.status_code not in (406, 500), (path, answer.text)
        assert answer.status_code in (400, 401, 404, 422), (path, answer.text)


# -- CORS -------------------------------------------------------------------------------------


async def test_cors_allows_only_configured_origins(make_client: AppFactory) -> None:
    client = await make_client(cors_origins="https://shop.example.co.ke")
    allowed = await client.get("/health", headers={"Origin": "https://shop.example.co.ke"})
    assert allowed.headers["access-control-allow-origin"] == "https://shop.example.co.ke"
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()

    refused = await client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in refused.headers


async def test_cors_preflight(make_client: AppFactory) -> None:
    client = await make_client(cors_origins=["https://shop.example.co.ke"])
    preflight = await client.options(
        "/test-http/notes",
        headers={
            "Origin": "https://shop.example.co.ke",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, idempotency-key, if-match",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://shop.example.co.ke"
    assert "POST" in preflight.headers["access-control-allow-methods"]

    refused = await client.options(
        "/test-http/notes",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    # Refused as every refusal is: a problem naming what was not allowed.
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "/problems/bad-request"
    assert refused.json()["refused"] == ["origin"]
    headers_refused = await client.options(
        "/test-http/notes",
        headers={
            "Origin": "https://shop.example.co.ke",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "x-evil",
        },
    )
    assert headers_refused.status_code == 400
    assert headers_refused.json()["refused"] == ["headers"]
    assert "its headers may not be used" in headers_refused.json()["detail"]


async def test_no_cors_headers_without_configured_origins(client: httpx2.AsyncClient) -> None:
    response = await client.get("/health", headers={"Origin": "https://shop.example.co.ke"})
    assert "access-control-allow-origin" not in response.headers


# -- compression ------------------------------------------------------------------------------


async def test_large_json_is_gzipped_when_accepted(make_client: AppFactory) -> None:
    client = await make_client()
    response = await client.get("/test-http/catalog", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert "accept-encoding" in response.headers["vary"].lower()
    assert len(response.json()["items"]) == 200  # the client decoded it
    assert int(response.headers["content-length"]) < len(response.content)


async def test_no_gzip_when_not_accepted_or_small(make_client: AppFactory) -> None:
    client = await make_client()
    plain = await client.get("/test-http/catalog", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert len(plain.json()["items"]) == 200

    small = await client.get("/test-http/catalog?count=1", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers


async def test_gzip_body_is_valid_gzip(make_client: AppFactory) -> None:
    client = await make_client()
    app = client._transport.app  # type: ignore[attr-defined]
    status, headers, body = await raw_request(
        app, "/test-http/catalog", [(b"accept-encoding", b"gzip")]
    )
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(body))["items"]) == 200
    assert len(body) < len(gzip.decompress(body))


async def test_the_gzip_level_is_the_configured_one(make_client: AppFactory) -> None:
    bodies = {}
    for level in (1, 9):
        client = await make_client(gzip_level=level)
        app = client._transport.app  # type: ignore[attr-defined]
        status, headers, body = await raw_request(
            app, "/test-http/catalog", [(b"accept-encoding", b"gzip")]
        )
        assert (status, headers["content-encoding"]) == (200, "gzip")
        bodies[level] = body
    assert gzip.decompress(bodies[1]) == gzip.decompress(bodies[9])
    assert len(bodies[9]) < len(bodies[1])


def test_the_gzip_level_must_be_one_of_zlibs(tmp_path: Path) -> None:
    for level in (0, 10):
        with pytest.raises(ValidationError, match="gzip_level"):
            make_settings(tmp_path, gzip_level=level)


# -- helpers used by other middleware ----------------------------------------------------------


def test_client_ip_believes_forwarded_for_only_from_trusted_proxies() -> None:
    scope: dict[str, Any] = {
        "client": ("10.0.0.2", 1234),
        "headers": [(b"x-forwarded-for", b"203.0.113.9, 198.51.100.1, 10.0.0.1")],
    }
    assert client_ip(scope) == "10.0.0.2"
    assert client_ip(scope, ["10.0.0.2"]) == "10.0.0.1"
    assert client_ip(scope, ["10.0.0.2", "10.0.0.1"]) == "198.51.100.1"
    assert client_ip({"client": None, "headers": []}) == "unknown"


def test_route_template_never_leaks_the_raw_path() -> None:
    assert route_template({}) == "<unmatched>"


def test_capability_paths_are_logged_without_their_token() -> None:
    from soko.platform.http import loggable_path, register_secret_path_prefix

    register_secret_path_prefix("/sandbox/pay/")
    assert loggable_path("/sandbox/pay/Zk3-secret-token") == "/sandbox/pay/***"
    assert loggable_path("/sandbox/pay/Zk3-secret-token/done") == "/sandbox/pay/***/done"
    assert loggable_path("/api/v1/products") == "/api/v1/products"
    with pytest.raises(ValueError):
        register_secret_path_prefix("/no-slash")


# -- HEAD ---------------------------------------------------------------------------------------


async def test_head_is_answered_wherever_get_is_without_a_body(client: httpx2.AsyncClient) -> None:
    for path in ("/health", "/api/v1/products?limit=2", "/problems/not-found", "/docs"):
        got = await client.get(path)
        head = await client.head(path)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        for name in ("content-type", "content-length", "etag", "cache-control"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
    # A path that answers no GET still says so.
    refused = await client.head("/api/v1/auth/login")
    assert refused.status_code == 405
    assert "POST" in refused.headers["allow"]
