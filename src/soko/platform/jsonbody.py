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

:func:`loads` reads the JSON columns the database returns (a catalog page decodes a
hundred of them) with orjson, and with the standard library whatever orjson refuses
(``NaN``, lone surrogates) or would read differently (integers beyond 64 bits, which
orjson turns into floats), so every document reads as before.
"""

from __future__ import annotations

import json
import re
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


# orjson reads an integer beyond 64 bits as a float (silently losing digits): a document
# holding a run of 19 digits or more, anywhere, is read by the standard library instead.
_LONG_DIGITS = re.compile(r"[0-9]{19}")
_LONG_DIGITS_BYTES = re.compile(rb"[0-9]{19}")


def loads(text: str | bytes) -> Any:
    """The value of a JSON document, as :func:`json.loads` reads it."""
    pattern = _LONG_DIGITS_BYTES if isinstance(text, bytes) else _LONG_DIGITS
    if pattern.search(text) is None:  # type: ignore[arg-type]
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)
