"""A route's query string read with one validation of a Pydantic model.

FastAPI reads a route's query parameters one at a time: for each parameter of the
route and of each dependency that declares some, it looks the value up, validates it
alone and collects its errors, and every dependency is a level of its own to solve. On
the public catalog listing (eleven parameters over three dependencies) that was a third
of the Python calls of a page served from the cache (ADR 0021).

:func:`query_reader` makes a dependency that takes the request's query string whole and
validates it with the model's own validator, in one call into pydantic-core::

    class ProductListQuery(QueryModel):
        limit: int = Field(20, ge=1, le=100, description="Page size")
        q: str | None = Field(None, max_length=100, description="Words to look for")

    ProductListQueryDep = Annotated[ProductListQuery, Depends(query_reader(ProductListQuery))]

    @router.get("/products", openapi_extra=query_parameters(ProductListQuery))
    async def list_products(query: ProductListQueryDep) -> ...: ...

What a client sees does not change: a value that fails answers the same 422 problem,
each error located ``("query", <name>)`` as FastAPI locates it, every error of the query
reported together; parameters the model does not name are ignored; a repeated name
takes its last value, as FastAPI's reading of a single value does.
:func:`query_parameters` documents the parameters as FastAPI documents a query model,
by asking FastAPI itself, with schemas the document would otherwise reference inlined.

Fields must be single values (no lists): FastAPI reads a list parameter from repeated
names, which a mapping of the query string does not hold, and :func:`query_reader`
refuses a model with one when the route is declared.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError

Q = TypeVar("Q", bound="QueryModel")

_SEQUENCES = (list, tuple, set, frozenset)


class QueryModel(BaseModel):
    """The query parameters of a route, as one model. Names it does not declare are
    ignored, as FastAPI ignores query parameters a route does not declare."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def _is_sequence(annotation: Any) -> bool:
    if typing.get_origin(annotation) in _SEQUENCES or annotation in _SEQUENCES:
        return True
    return any(_is_sequence(argument) for argument in typing.get_args(annotation))


def _names(model: type[QueryModel]) -> tuple[str, ...]:
    """The query names the model reads (a field's alias where it has one)."""
    names = []
    for name, info in model.model_fields.items():
        if _is_sequence(info.annotation):
            raise TypeError(
                f"{model.__name__}.{name} is a sequence: a query model holds single values"
            )
        names.append(info.alias or name)
    return tuple(names)


def query_reader(model: type[Q]) -> Callable[[Request], Awaitable[Q]]:
    """A dependency answering the request's query parameters as ``model``, or raising
    :class:`RequestValidationError` with every error of the query."""
    names = _names(model)
    validate = model.model_validate

    # async: a plain function dependency would be sent to a worker thread per request.
    async def read_query(request: Request) -> Q:
        params = request.query_params
        given = {name: params[name] for name in names if name in params}
        try:
            return validate(given)
        except ValidationError as error:
            raise RequestValidationError(
                [
                    {**detail, "loc": ("query", *detail["loc"])}
                    for detail in error.errors(include_url=False)
                ]
            ) from None

    read_query.__qualname__ = f"read_query[{model.__name__}]"
    return read_query


def _inlined(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with every ``#/components/schemas/...`` reference replaced by the
    schema it names."""
    if isinstance(schema, list):
        return [_inlined(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    reference = schema.get("$ref")
    if isinstance(reference, str) and reference.startswith("#/components/schemas/"):
        target = definitions[reference.rsplit("/", 1)[1]]
        rest = {key: value for key, value in schema.items() if key != "$ref"}
        return {**_inlined(target, definitions), **_inlined(rest, definitions)}
    return {key: _inlined(value, definitions) for key, value in schema.items()}


def query_parameters(model: type[QueryModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route reading ``model`` with :func:`query_reader`: its
    parameters as FastAPI documents ``Annotated[model, Query()]``, self-contained."""
    _names(model)
    probe = FastAPI(openapi_url="/openapi.json")

    async def route(query: Any) -> None:
        del query

    # Set after definition: postponed annotations would name ``model`` as a string that
    # FastAPI evaluates in this module's globals, where it is not.
    route.__annotations__["query"] = Annotated[model, Query()]
    probe.get("/")(route)
    document = probe.openapi()
    definitions = document.get("components", {}).get("schemas", {})
    parameters = document["paths"]["/"]["get"].get("parameters", [])
    return {"parameters": copy.deepcopy(_inlined(parameters, definitions))}
