"""FastAPI's per-parameter answers, remembered: the same answers as FastAPI's own for
every parameter of every route, and requests parsed as before."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import fastapi.dependencies.utils as fastapi_utils
import httpx2
import pytest
from fastapi import FastAPI, Header, Query
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from soko.platform import fastapi_params


def _fields(dependant: Dependant) -> list[Any]:
    found = [
        *dependant.path_params,
        *dependant.query_params,
        *dependant.header_params,
        *dependant.cookie_params,
        *dependant.body_params,
    ]
    for sub in dependant.dependencies:
        found.extend(_fields(sub))
    return found


def _api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)  # an included router
        if included is not None:
            yield from _api_routes(included.routes)


def test_every_parameter_of_the_app_gets_fastapis_own_answers(app: FastAPI) -> None:
    assert hasattr(fastapi_utils._get_param_model, "__soko_remembered__")
    own = fastapi_params.originals()
    fields = [field for route in _api_routes(app.routes) for field in _fields(route.dependant)]
    assert len(fields) > 100
    for _ in range(2):  # computed, then remembered
        for field in fields:
            assert fastapi_utils._get_param_model(field) == own["_get_param_model"](field)
            assert fastapi_utils._is_json_field(field) == own["_is_json_field"](field)
            for convert in (False, True):
                assert fastapi_utils._get_param_aliases(field, convert_underscores=convert) == own[
                    "_get_param_aliases"
                ](field, convert_underscores=convert)
            annotation = field.field_info.annotation
            assert fastapi_utils.field_annotation_is_sequence(annotation) == own[
                "field_annotation_is_sequence"
            ](annotation)


def test_installing_twice_wraps_once() -> None:
    fastapi_params.install()
    first = fastapi_utils._get_param_aliases
    fastapi_params.install()
    assert fastapi_utils._get_param_aliases is first
    assert fastapi_params.originals()["_get_param_aliases"] is not first


def test_a_fastapi_whose_functions_changed_stops_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def renamed(field: Any, *, underscores: bool = False) -> Any:
        return []

    monkeypatch.setattr(fastapi_utils, "_get_param_aliases", renamed)
    with pytest.raises(RuntimeError, match="_get_param_aliases"):
        fastapi_params.install()


async def test_requests_are_parsed_as_before() -> None:
    fastapi_params.install()
    app = FastAPI()

    @app.get("/echo")
    async def echo(
        tags: Annotated[list[str] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1)] = 5,
        x_trace_id: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        return {"tags": tags, "limit": limit, "trace": x_trace_id}

    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(2):
            answer = await client.get("/echo?tags=a&tags=b&limit=3", headers={"X-Trace-Id": "t-1"})
            assert answer.json() == {"tags": ["a", "b"], "limit": 3, "trace": "t-1"}
            assert (await client.get("/echo")).json() == {"tags": None, "limit": 5, "trace": None}
            refused = await client.get("/echo?limit=0")
            assert refused.status_code == 422
            assert refused.json()["detail"][0]["loc"] == ["query", "limit"]
