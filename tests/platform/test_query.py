"""A query string read with one validation of a model answers and documents as FastAPI's
own reading of the same model does."""

from __future__ import annotations

import enum
from typing import Annotated, Any

import httpx2
import pytest
from fastapi import Depends, FastAPI, Query
from pydantic import Field

from soko.platform.errors import install_problem_handlers
from soko.platform.query import QueryModel, query_parameters, query_reader


class Colour(enum.StrEnum):
    red = "red"
    green = "green"


class Filters(QueryModel):
    limit: int = Field(20, ge=1, le=100, description="Page size")
    q: str | None = Field(None, max_length=5, description="Words")
    cheap: bool = Field(False, description="Only cheap ones")
    colour: Colour = Field(Colour.red, description="A colour")
    code: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    after: int | None = Field(None, alias="from", ge=0)


def _apps() -> tuple[FastAPI, FastAPI]:
    """The same route twice: read by :func:`query_reader`, and FastAPI's own way."""
    ours, theirs = FastAPI(), FastAPI()
    for app in (ours, theirs):
        install_problem_handlers(app)

    @ours.get("/items", openapi_extra=query_parameters(Filters))
    async def read_ours(
        query: Annotated[Filters, Depends(query_reader(Filters))],
    ) -> dict[str, Any]:
        return query.model_dump(mode="json")

    async def read_theirs(query: Any) -> dict[str, Any]:
        return query.model_dump(mode="json")  # type: ignore[no-any-return]

    read_theirs.__annotations__["query"] = Annotated[Filters, Query()]
    theirs.get("/items")(read_theirs)
    return ours, theirs


QUERIES = [
    "",
    "limit=5&q=kiko&cheap=true&colour=green&code=KES&from=3",
    "limit=0",
    "limit=abc&q=toolong&colour=blue&code=kes&from=-1&cheap=maybe",
    "limit=",
    "cheap=1&cheap=0",
    "limit=7&limit=101",
    "unknown=1&limit=3",
    "after=5",
    "from=5",
    "q=%F0%9F%90%98",
]


@pytest.mark.parametrize("query", QUERIES)
async def test_an_answer_is_the_one_fastapi_gives_for_the_same_model(query: str) -> None:
    answers = []
    for app in _apps():
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://soko") as client:
            response = await client.get(f"/items?{query}")
        body = response.json()
        body.pop("request_id", None)
        answers.append((response.status_code, body))
    ours, theirs = answers
    assert ours == theirs


async def test_every_error_of_the_query_is_reported_at_its_parameter() -> None:
    app, _ = _apps()
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://soko") as client:
        response = await client.get("/items?limit=0&colour=blue&from=-2")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    errors = response.json()["errors"]
    assert [(error["in"], error["field"]) for error in errors] == [
        ("query", "limit"),
        ("query", "colour"),
        ("query", "from"),
    ]


def test_the_parameters_are_documented_as_fastapi_documents_the_model() -> None:
    ours, theirs = _apps()
    documented = ours.openapi()["paths"]["/items"]["get"]["parameters"]
    expected = theirs.openapi()["paths"]["/items"]["get"]["parameters"]
    assert [p["name"] for p in documented] == ["limit", "q", "cheap", "colour", "code", "from"]
    colour_schema = theirs.openapi()["components"]["schemas"]["Colour"]
    for ours_one, theirs_one in zip(documented, expected, strict=True):
        if ours_one["name"] == "colour":
            # Inlined: the document of the route that reads the model names no schema.
            reference = theirs_one["schema"].pop("$ref")
            assert reference == "#/components/schemas/Colour"
            theirs_one["schema"] = {**colour_schema, **theirs_one["schema"]}
        assert ours_one == theirs_one
    assert "Colour" not in ours.openapi().get("components", {}).get("schemas", {})


def test_a_model_with_a_list_is_refused_when_the_route_is_declared() -> None:
    class Tags(QueryModel):
        tag: list[str] = []

    with pytest.raises(TypeError, match="sequence"):
        query_reader(Tags)
    with pytest.raises(TypeError, match="sequence"):
        query_parameters(Tags)
