from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import APIRouter, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

import soko
from soko.platform import errors
from soko.platform.errors import (
    Conflict,
    ProblemError,
    ValidationFailed,
    field_errors,
    json_pointer,
    problem_for_status,
)
from tests.platform.test_http import raw_request

PROBLEMS_DOC = Path(__file__).resolve().parents[2] / "docs" / "problems.md"
SECRET_TEXT = "password=hunter2 at /srv/soko/orders.py line 42"


class StockTooLow(ProblemError):
    """A domain-style problem, declared the way a domain's errors.py does."""

    slug = "test-stock-too-low"
    title = "Not enough stock"
    status = 409
    description = "Test-only problem type."


# The registry is global; keep the test-only type out of the docs check below.
TEST_ONLY_SLUGS = {StockTooLow.slug}


class Address(BaseModel):
    city: str = Field(min_length=2)
    postcode: str = Field(pattern=r"^\d{5}$")


class OrderIn(BaseModel):
    quantity: int = Field(ge=1, le=99)
    sku: str
    deliver_to: Address


def error_router() -> APIRouter:
    router = APIRouter()

    @router.post("/test-errors/orders")
    async def place(order: OrderIn) -> dict[str, int]:
        return {"quantity": order.quantity}

    @router.get("/test-errors/orders/{order_id}")
    async def show(order_id: int) -> dict[str, int]:
        return {"id": order_id}

    @router.post("/test-errors/stock")
    async def reserve() -> None:
        raise StockTooLow("Only 2 left of SKU-1", headers={"Retry-After": "30"}, available=2)

    @router.post("/test-errors/conflict")
    async def conflict() -> None:
        raise Conflict()

    @router.get("/test-errors/teapot")
    async def teapot() -> None:
        raise HTTPException(status_code=418)

    @router.get("/test-errors/gone")
    async def gone() -> None:
        raise HTTPException(status_code=410, detail="This listing was withdrawn")

    @router.post("/test-errors/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @router.get("/test-errors/boom")
    async def boom() -> None:
        raise RuntimeError(SECRET_TEXT)

    return router


@pytest.fixture
async def errors_client(app: FastAPI) -> Any:
    app.include_router(error_router())
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def assert_problem(response: httpx2.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_404_problem(errors_client: httpx2.AsyncClient) -> None:
    response = await errors_client.get("/nowhere", headers={"X-Request-ID": "req-404"})
    body = assert_problem(response, 404, "not-found")
    assert body["request_id"] == "req-404"
    assert body["instance"] == "/nowhere"


async def test_405_problem_names_allowed_methods(errors_client: httpx2.AsyncClient) -> None:
    response = await errors_client.delete("/test-errors/orders")
    body = assert_problem(response, 405, "method-not-allowed")
    assert "DELETE" in body["detail"]
    assert "POST" in response.headers["allow"]


async def test_problem_error_subclass_answers_its_own_type(
    errors_client: httpx2.AsyncClient,
) -> None:
    response = await errors_client.post("/test-errors/stock")
    body = assert_problem(response, 409, "test-stock-too-low")
    assert body["title"] == "Not enough stock"
    assert body["detail"] == "Only 2 left of SKU-1"
    assert body["available"] == 2
    assert response.headers["retry-after"] == "30"

    plain = await errors_client.post("/test-errors/conflict")
    body = assert_problem(plain, 409, "conflict")
    assert body["detail"] == Conflict.title


async def test_plain_http_exceptions_become_problems(errors_client: httpx2.AsyncClient) -> None:
    teapot = await errors_client.get("/test-errors/teapot")
    body = assert_problem(teapot, 418, "internal-error")
    assert body["detail"] == "I'm a Teapot"

    gone = await errors_client.get("/test-errors/gone")
    assert assert_problem(gone, 410, "internal-error")["detail"] == "This listing was withdrawn"


async def test_validation_errors_name_each_field(errors_client: httpx2.AsyncClient) -> None:
    response = await errors_client.post(
        "/test-errors/orders",
        json={"quantity": 0, "deliver_to": {"city": "N", "postcode": "abc"}},
    )
    body = assert_problem(response, 422, "validation-error")
    by_field = {error["field"]: error for error in body["errors"]}
    assert set(by_field) == {"quantity", "sku", "deliver_to.city", "deliver_to.postcode"}
    assert all(error["in"] == "body" for error in body["errors"])
    assert by_field["deliver_to.postcode"]["pointer"] == "#/deliver_to/postcode"
    assert by_field["sku"]["code"] == "missing"
    assert by_field["quantity"]["code"] == "greater_than_equal"
    assert all(error["detail"] for error in body["errors"])
    assert body["detail"] == "4 fields failed validation"


async def test_validation_errors_for_path_and_malformed_json(
    errors_client: httpx2.AsyncClient,
) -> None:
    path = await errors_client.get("/test-errors/orders/not-a-number")
    body = assert_problem(path, 422, "validation-error")
    assert body["errors"] == [
        {
            "in": "path",
            "field": "order_id",
            "pointer": None,
            "detail": body["errors"][0]["detail"],
            "code": "int_parsing",
        }
    ]

    broken = await errors_client.post(
        "/test-errors/orders",
        content=b'{"quantity": 1,',
        headers={"Content-Type": "application/json"},
    )
    body = assert_problem(broken, 422, "validation-error")
    assert body["detail"] == "The body is not valid JSON"
    # The whole document failed, not a member: the empty pointer, no field name (the
    # parser's location is a character offset, named in the detail).
    assert body["errors"] == [
        {
            "in": "body",
            "field": "",
            "pointer": "#",
            "detail": body["errors"][0]["detail"],
            "code": "json_invalid",
        }
    ]
    assert body["errors"][0]["detail"].startswith("The body is not valid JSON: ")
    assert "(at character 15)" in body["errors"][0]["detail"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"sku": "\xff"}', "it is not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "it nests arrays or objects too deeply"),
        (b'{"quantity": ' + b"9" * 5000 + b"}", "it holds a number with too many digits"),
    ],
)
async def test_a_body_json_cannot_read_is_invalid_json_too(
    errors_client: httpx2.AsyncClient, content: bytes, reason: str
) -> None:
    response = await errors_client.post(
        "/test-errors/orders", content=content, headers={"Content-Type": "application/json"}
    )
    body = assert_problem(response, 422, "validation-error")
    assert body["errors"] == [
        {
            "in": "body",
            "field": "",
            "pointer": "#",
            "detail": f"The body is not valid JSON: {reason}",
            "code": "json_invalid",
        }
    ]


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_a_body_sent_as_another_media_type_is_415(
    errors_client: httpx2.AsyncClient, content_type: str | None
) -> None:
    response = await errors_client.post(
        "/test-errors/orders",
        content=b'{"quantity": 1, "sku": "A"}',
        headers={"Content-Type": content_type} if content_type else {},
    )
    body = assert_problem(response, 415, "unsupported-media-type")
    assert "application/json" in body["detail"]


async def test_a_missing_body_is_a_missing_field_whatever_its_media_type(
    errors_client: httpx2.AsyncClient,
) -> None:
    body = assert_problem(await errors_client.post("/test-errors/orders"), 422, "validation-error")
    assert [error["code"] for error in body["errors"]] == ["missing"]


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/merge-patch+json"],
)
async def test_json_media_types_are_read_as_json(
    errors_client: httpx2.AsyncClient, content_type: str
) -> None:
    response = await errors_client.post(
        "/test-errors/orders",
        content=b'{"quantity": 1, "sku": "A", "deliver_to": {"city": "Nairobi"}}',
        headers={"Content-Type": content_type},
    )
    # Read: the one error is the missing postcode's, a field of the parsed body.
    body = assert_problem(response, 422, "validation-error")
    assert [error["field"] for error in body["errors"]] == ["deliver_to.postcode"]


async def test_validation_errors_never_echo_the_input(errors_client: httpx2.AsyncClient) -> None:
    response = await errors_client.post(
        "/test-errors/orders",
        json={
            "quantity": 1,
            "sku": "A",
            "deliver_to": {"city": "Nairobi", "postcode": SECRET_TEXT},
        },
    )
    assert response.status_code == 422
    assert "hunter2" not in response.text


async def test_a_client_gone_while_its_body_is_read_is_no_server_error(
    app: FastAPI, errors_client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The sender's connection dropped mid-body (a webhook sender killed, a timeout).
    status, _, _ = await raw_request(
        app,
        "/test-errors/raw",
        [(b"content-type", b"application/json")],
        [b'{"half": '],
        hang_up=True,
    )
    assert status == 400
    assert "unhandled_error" not in caplog.text and "Traceback" not in caplog.text
    assert "client_disconnected" in caplog.text


async def test_unhandled_exception_is_a_500_problem_without_internals(
    errors_client: httpx2.AsyncClient,
) -> None:
    response = await errors_client.get("/test-errors/boom", headers={"X-Request-ID": "req-500"})
    body = assert_problem(response, 500, "internal-error")
    assert body["request_id"] == "req-500"
    text = response.text
    for leak in ("hunter2", "RuntimeError", "Traceback", "orders.py", "password"):
        assert leak not in text
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


def test_problem_for_status_and_field_errors() -> None:
    assert problem_for_status(404) is errors.NotFound
    assert problem_for_status(428) is errors.PreconditionRequired
    assert problem_for_status(418) is ProblemError
    assert field_errors([{"loc": ("query", "limit"), "msg": "too big", "type": "le"}]) == [
        {"in": "query", "field": "limit", "pointer": None, "detail": "too big", "code": "le"}
    ]


def test_pointers_are_rfc_6901_in_uri_fragment_form() -> None:
    assert json_pointer([]) == "#"
    assert json_pointer(["variants", "0", "price"]) == "#/variants/0/price"
    # RFC 6901 section 3: "~" is written "~0" and "/" "~1"; section 6: then percent-encoded.
    assert json_pointer(["options", "size/fit", "a~b"]) == "#/options/size~1fit/a~0b"
    assert json_pointer(["notes", "50% off", "ñ"]) == "#/notes/50%25%20off/%C3%B1"
    assert json_pointer([""]) == "#/"
    # A rule broken by the body as a whole names the whole document, not a member "".
    (whole,) = field_errors([{"loc": ("body",), "msg": "send either", "type": "value_error"}])
    assert (whole["field"], whole["pointer"]) == ("", "#")
    (member,) = field_errors(
        [{"loc": ("body", "options", "size/fit"), "msg": "too long", "type": "string_too_long"}]
    )
    assert member["pointer"] == "#/options/size~1fit"
    # A service's rule names its field with dots: the pointer has a step for each.
    (rule,) = ValidationFailed.of_field("variants.0.price", "cannot be negative").extensions[
        "errors"
    ]
    assert (rule["field"], rule["pointer"]) == ("variants.0.price", "#/variants/0/price")
    (query,) = ValidationFailed.of_field("limit", "too big", location="query").extensions["errors"]
    assert query["pointer"] is None


def test_a_slug_cannot_be_declared_twice() -> None:
    with pytest.raises(TypeError):

        class Again(ProblemError):
            slug = "not-found"


# -- the catalogue of problem types --------------------------------------------------------------


def documented_slugs() -> dict[str, str]:
    """Each ``## `slug` `` section of docs/problems.md (and of the per-domain pages in
    docs/problems/) and its text."""
    pages = [PROBLEMS_DOC, *sorted((PROBLEMS_DOC.parent / "problems").glob("*.md"))]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    found = {}
    for section in sections:
        heading, _, body = section.partition("\n")
        match = re.match(r"`([a-z0-9-]+)`", heading.strip())
        assert match, f"section heading {heading!r} does not start with a `slug`"
        found[match.group(1)] = body
    return found


def import_every_module() -> None:
    """Problem types register when their module is imported: import them all, so a type
    declared anywhere in Soko is checked."""
    for module in pkgutil.walk_packages(soko.__path__, "soko."):
        if not module.name.endswith(".__main__"):  # that one runs the CLI
            importlib.import_module(module.name)


def registered_slugs() -> dict[str, type[ProblemError]]:
    import_every_module()
    return {slug: cls for slug, cls in errors.REGISTRY.items() if slug not in TEST_ONLY_SLUGS}


def test_every_registered_problem_is_documented() -> None:
    documented = documented_slugs()
    missing = sorted(set(registered_slugs()) - set(documented))
    assert not missing, f"add these problem types to docs/problems.md: {missing}"
    for slug, problem in registered_slugs().items():
        section = documented[slug]
        assert f"**Status:** {problem.status} " in section, slug
        assert f"**Title:** {problem.title} " in section, slug
        assert f"**Type:** `{problem.type_uri()}`" in section, slug
        assert "**Meaning:**" in section and "**Client:**" in section, slug


async def test_problem_pages_describe_each_type(errors_client: httpx2.AsyncClient) -> None:
    for slug, problem in registered_slugs().items():
        response = await errors_client.get(f"/problems/{slug}")
        assert response.status_code == 200, slug
        assert response.headers["content-type"].startswith("text/html")
        assert str(problem.status) in response.text
        assert "`" not in response.text, slug  # inline code is <code>, not backquotes
    allowed = (await errors_client.get("/problems/method-not-allowed")).text
    assert "see <code>Allow</code>." in allowed
    missing = await errors_client.get("/problems/no-such-problem")
    assert_problem(missing, 404, "not-found")


def test_inline_code_is_escaped_and_unpaired_backquotes_are_left() -> None:
    from soko.app import _inline_code

    assert _inline_code("send `<If-Match>` & retry") == (
        "send <code>&lt;If-Match&gt;</code> &amp; retry"
    )
    assert _inline_code("a lone ` stays") == "a lone ` stays"
