"""Every time a JSON body gives the API carries its UTC offset: a time without one
(``"2026-12-07T00:00:00"``) is refused on its field with a 422, never read in some
zone of the server's or answered with a 500. The models are found from the app's own
routes, so a field added later is checked without touching this file."""

from __future__ import annotations

import datetime as dt
import types
import typing
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from pydantic import (
    AwareDatetime,
    BaseModel,
    FutureDatetime,
    NaiveDatetime,
    PastDatetime,
    ValidationError,
)

from tests.api.test_body_integers import _dependants, _models_in

# A datetime, and pydantic's datetime types (classes of their own, not subclasses).
_DATETIMES: set[object] = {dt.datetime, AwareDatetime, NaiveDatetime, PastDatetime, FutureDatetime}


def _datetime_fields(
    model: type[BaseModel], seen: set[type[BaseModel]]
) -> Iterator[tuple[type[BaseModel], str]]:
    if model in seen:
        return
    seen.add(model)
    for name, info in model.model_fields.items():
        annotation = info.annotation
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        options = set(typing.get_args(annotation)) if union else {annotation}
        if options & _DATETIMES or any(
            typing.get_origin(option) is typing.Annotated
            and typing.get_args(option)[0] in _DATETIMES
            for option in options
        ):
            yield model, name
        for nested in _models_in(annotation):
            yield from _datetime_fields(nested, seen)


def _body_datetime_fields(app: FastAPI) -> list[tuple[type[BaseModel], str]]:
    seen: set[type[BaseModel]] = set()
    found = []
    for context in iter_route_contexts(app.routes):
        dependant = getattr(context, "dependant", None)
        if dependant is None:
            continue
        for each in _dependants(dependant):
            for param in each.body_params:
                for model in _models_in(param.field_info.annotation):
                    found.extend(_datetime_fields(model, seen))
    return found


def test_every_time_in_a_body_needs_its_offset(app: FastAPI) -> None:
    fields = _body_datetime_fields(app)
    for model, name in fields:
        with pytest.raises(ValidationError) as caught:
            model.model_validate({name: "2026-12-07T00:00:00"})
        refused = {error["type"] for error in caught.value.errors() if error["loc"] == (name,)}
        assert refused == {"timezone_aware"}, f"{model.__name__}.{name}: {refused}"
    named = {f"{model.__name__}.{name}" for model, name in fields}
    assert {"MarkAllRead.before", "RedeliverFailedIn.since"} <= named, named
