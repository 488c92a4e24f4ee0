from __future__ import annotations

import copy
import re
from typing import Any

import httpx2
import pytest
from fastapi import APIRouter, FastAPI
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from pydantic import BaseModel, Field

from soko.platform.errors import NotFound, problem_responses
from soko.platform.money import Money
from soko.platform.pagination import Page, PageRequestDep

PROBLEM = "application/problem+json"
METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


class OfferIn(BaseModel):
    title: str = Field(min_length=1)
    price: Money


class OfferOut(OfferIn):
    id: str


def offers_router() -> APIRouter:
    router = APIRouter(prefix="/test-openapi", tags=["offers"])

    @router.post("/offers", status_code=201, responses=problem_responses(409))
    async def create_offer(offer: OfferIn) -> OfferOut:
        return OfferOut(id="1", **offer.model_dump())

    @router.get("/offers/{offer_id}", responses=problem_responses(404))
    async def show_offer(offer_id: str) -> OfferOut:
        raise NotFound()

    @router.get("/offers")
    async def list_offers(page: PageRequestDep) -> Page[OfferOut]:
        return Page(items=[])

    return router


@pytest.fixture
async def document(app: FastAPI) -> dict[str, Any]:
    app.include_router(offers_router())
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


async def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(copy.deepcopy(document), cls=OpenAPIV31SpecValidator)
    assert document["info"]["title"] == "Soko"


def test_the_validator_is_not_a_rubber_stamp() -> None:
    broken = {
        "openapi": "3.1.0",
        "info": {"title": "x"},
        "paths": {"/a": {"get": {"responses": 7}}},
    }
    with pytest.raises(Exception, match=r"version|responses"):
        validate(broken, cls=OpenAPIV31SpecValidator)


async def test_every_operation_documents_problem_responses(document: dict[str, Any]) -> None:
    found = operations(document)
    assert {path for path, _, _ in found} >= {"/test-openapi/offers", "/health"}
    for path, method, operation in found:
        default = operation["responses"]["default"]
        assert default["content"][PROBLEM]["schema"]["$ref"] == "#/components/schemas/Problem"
        for status, response in operation["responses"].items():
            # An error status either documents problem+json or no body shape at all
            # (as /ready's 503, whose body is its per-dependency report).
            if status.startswith(("4", "5")) and "content" in response:
                assert set(response["content"]) == {PROBLEM}, (path, method, status)


async def test_validation_errors_are_documented_as_problems(document: dict[str, Any]) -> None:
    create = document["paths"]["/test-openapi/offers"]["post"]
    invalid = create["responses"]["422"]["content"][PROBLEM]["schema"]
    assert invalid["$ref"] == "#/components/schemas/UnprocessableProblem"
    schemas = document["components"]["schemas"]
    # A validation error has its errors; other 422 problems (weak-password, ...) not.
    assert schemas["UnprocessableProblem"]["anyOf"] == [
        {"$ref": "#/components/schemas/ValidationProblem"},
        {"$ref": "#/components/schemas/Problem"},
    ]
    assert schemas["ValidationProblem"]["allOf"][1]["required"] == ["errors"]
    assert "HTTPValidationError" not in schemas
    assert schemas["Problem"]["required"] == ["type", "title", "status", "detail"]
    assert create["responses"]["409"]["content"][PROBLEM]
    show = document["paths"]["/test-openapi/offers/{offer_id}"]["get"]
    assert show["responses"]["404"]["description"] == "Not found"
    # A JSON body read as anything else is 415: documented where a body is read only.
    assert create["responses"]["415"]["content"][PROBLEM]["schema"]["$ref"] == (
        "#/components/schemas/Problem"
    )
    assert "415" not in show["responses"]


async def test_money_and_pages_have_schemas(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    money = schemas["Money"]
    assert money["properties"]["amount"]["type"] == "integer"
    assert money["required"] == ["amount", "currency"]
    listing = document["paths"]["/test-openapi/offers"]["get"]
    parameters = {p["name"] for p in listing["parameters"]}
    assert parameters == {"limit", "cursor"}


async def test_docs_ui_is_served_from_this_origin(client: httpx2.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    # Everything the page loads comes from here: no CDN, no inline script.
    loaded = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert sorted(loaded) == [
        "/docs/assets/favicon.png",
        "/docs/assets/start.js",
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
    ]
    assert "<script>" not in response.text
    policy = dict(
        part.strip().split(" ", 1)
        for part in response.headers["content-security-policy"].split(";")
    )
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["default-src"] == "'none'"
    assert "http" not in response.headers["content-security-policy"]

    start = await client.get("/docs/assets/start.js")
    assert start.status_code == 200
    assert start.headers["content-type"].startswith("text/javascript")
    assert '"url": "/api/v1/openapi.json"' in start.text
    assert '"validatorUrl": null' in start.text
    assert (await client.get("/api/v1/openapi.json")).status_code == 200

    bundle = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    assert "javascript" in bundle.headers["content-type"]
    assert "SwaggerUIBundle" in bundle.text
    # Swagger UI 5: the first to read OpenAPI 3.1, which FastAPI writes.
    assert re.search(r'"5\.\d+\.\d+"', bundle.text)
    assert bundle.headers["cache-control"] == "public, max-age=86400"
    again = await client.get(
        "/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": bundle.headers["etag"]}
    )
    assert (again.status_code, again.content) == (304, b"")
    assert again.headers["cache-control"] == "public, max-age=86400"
    css = await client.get("/docs/assets/swagger-ui.css")
    assert (css.status_code, css.headers["content-type"].split(";")[0]) == (200, "text/css")
    favicon = await client.get("/docs/assets/favicon.png")
    assert (favicon.status_code, favicon.headers["content-type"]) == (200, "image/png")

    # Only the named assets: nothing else of the package's directory, no path of the
    # client's making.
    for name in ("redoc.standalone.js", "..%2F__init__.py", "nothing.js"):
        missing = await client.get(f"/docs/assets/{name}")
        assert missing.status_code == 404, name
        assert missing.headers["content-type"] == "application/problem+json"


async def test_what_a_routes_dependencies_answer_is_documented(
    app: FastAPI, document: dict[str, Any]
) -> None:
    # Signing in, permissions, cursors, field lists and the store to act for answer
    # problems on every route that uses them: each such route lists the status.
    from fastapi.routing import APIRoute, iter_route_contexts

    from soko.platform.auth import PUBLIC, declared_permission

    routes = [
        r
        for r in iter_route_contexts(app.routes)
        if isinstance(r.original_route, APIRoute) and r.path_format in document["paths"]
    ]
    protected = public = 0
    for route in routes:
        permission = declared_permission(route.dependant)
        for method in route.methods or ():
            operation = document["paths"][route.path_format].get(method.lower())
            if operation is None:  # HEAD beside GET
                continue
            responses = operation["responses"]
            where = (method, route.path_format)
            if permission not in (None, PUBLIC):
                protected += 1
                assert {"401", "403"} <= set(responses), where
                assert responses["401"]["content"][PROBLEM]["schema"]["$ref"].endswith("/Problem")
            else:
                public += 1
            if route.path_format.startswith("/api/v1/seller/"):
                assert {"400", "401", "403"} <= set(responses), where
    assert protected > 100 and public > 10
    listing = document["paths"]["/api/v1/products"]["get"]["responses"]
    assert "400" in listing  # a bad cursor or an unknown field
    assert "401" not in listing  # the catalog is public
    paged = document["paths"]["/test-openapi/offers"]["get"]["responses"]
    assert paged["400"]["description"] == "Bad request"
