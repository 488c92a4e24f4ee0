"""Every time a JSON body gives the API carries its UTC offset: a time without one
(``"2026-12-07T00:00:00"``) is refused on its field with a 422, never read in some
zone of the server's or answered with a 500. The models are found from the app's own
routes, so a field added later is checked without touching this file."""

from __future__ import annotations

import datetime as dt
import typing

import pytest
from fastapi import FastAPI
from pydantic import (
    AwareDatetime,
    FutureDatetime,
    NaiveDatetime,
    PastDatetime,
    ValidationError,
)

from tests.api.test_body_integers import body_fields

# A datetime, and pydantic's datetime types (classes of their own, not subclasses).
_DATETIMES: set[object] = {dt.datetime, AwareDatetime, NaiveDatetime, PastDatetime, FutureDatetime}


def _is_datetime(types_: set[object]) -> bool:
    return bool(types_ & _DATETIMES) or any(
        typing.get_origin(option) is typing.Annotated and typing.get_args(option)[0] in _DATETIMES
        for option in types_
    )


def test_every_time_in_a_body_needs_its_offset(app: FastAPI) -> None:
    fields = body_fields(app, _is_datetime)
    for model, name in fields:
        with pytest.raises(ValidationError) as caught:
            model.model_validate({name: "2026-12-07T00:00:00"})
        refused = {error["type"] for error in caught.value.errors() if error["loc"] == (name,)}
        assert refused == {"timezone_aware"}, f"{model.__name__}.{name}: {refused}"
    named = {f"{model.__name__}.{name}" for model, name in fields}
    assert {"MarkAllRead.before", "RedeliverFailedIn.since"} <= named, named
