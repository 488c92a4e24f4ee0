"""Every integer field of every JSON body the API reads takes only JSON integers: a
boolean (``"quantity": true``) or a numeric string (``"5"``) is refused on that field,
never read as 1 or 5. The models are found from the app's own routes, so a field added
later is checked without touching this file."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, ValidationError


def _dependants(dependant: Any) -> Iterator[Any]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for argument in typing.get_args(annotation):
        yield from _models_in(argument)


def _fields(
    model: type[BaseModel], seen: set[type[BaseModel]], wanted: Callable[[set[Any]], bool]
) -> Iterator[tuple[type[BaseModel], str]]:
    """(model, field) of each field whose types (the options of a union, ``None`` left
    out) ``wanted`` accepts, in nested models too."""
    if model in seen:
        return
    seen.add(model)
    for name, info in model.model_fields.items():
        annotation = info.annotation
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        options = set(typing.get_args(annotation)) if union else {annotation}
        if wanted(options - {type(None)}):
            yield model, name
        for nested in _models_in(annotation):
            yield from _fields(nested, seen, wanted)


def body_fields(
    app: FastAPI, wanted: Callable[[set[Any]], bool]
) -> list[tuple[type[BaseModel], str]]:
    """Every field of every JSON body the app's routes read whose types ``wanted``
    accepts."""
    seen: set[type[BaseModel]] = set()
    found = []
    for context in iter_route_contexts(app.routes):
        dependant = getattr(context, "dependant", None)
        if dependant is None:
            continue
        for each in _dependants(dependant):
            for param in each.body_params:
                for model in _models_in(param.field_info.annotation):
                    found.extend(_fields(model, seen, wanted))
    return found


def test_every_integer_field_of_a_body_refuses_booleans_and_strings(app: FastAPI) -> None:
    fields = body_fields(app, lambda types_: types_ == {int})
    for model, name in fields:
        for value in (True, False, "5"):
            # FastAPI validates a parsed body in Python mode, as here.
            with pytest.raises(ValidationError) as caught:
                model.model_validate({name: value})
            refused = {error["type"] for error in caught.value.errors() if error["loc"] == (name,)}
            assert refused == {"int_type"}, f"{model.__name__}.{name} = {value!r}: {refused}"
    # The fields this was written for, so the walk cannot silently find none.
    named = {f"{model.__name__}.{name}" for model, name in fields}
    assert {"LineAdd.quantity", "LineChange.quantity", "CheckoutIn.expected_total_minor"} <= named
