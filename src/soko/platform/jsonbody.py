"""JSON bodies for the hot read paths, written by orjson.

Rendering a catalog page is mostly building dicts and serializing them. orjson writes the
same bytes as pydantic-core for the data those pages hold (strings, integers, booleans,
``None``, lists, dicts with string keys, UUIDs and datetimes, ``Z`` for UTC) in about a
quarter of the time. The UUIDs that asyncpg returns are a subclass of ``uuid.UUID``;
orjson knows only the exact class and pydantic-core takes a slow path for the subclass,
so both are given their text here.

Whatever orjson refuses (an integer beyond 64 bits, a ``Decimal``, a dict with
non-string keys, ...) is serialized by pydantic-core instead, so every value pydantic-core
could write still gets an answer.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from pydantic_core import to_json

_OPTIONS = orjson.OPT_UTC_Z


def _default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable by orjson")


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return to_json(value)
