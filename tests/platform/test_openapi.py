from __future__ import annotations

import copy
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
    assert invalid["$ref"] == "#/components/schemas/ValidationProblem"
    schemas = document["components"]["schemas"]
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


async def test_docs_ui_is_served(client: httpx2.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/api/v1/openapi.json" in response.text
    assert "swagger-ui" in response.text.lower()
