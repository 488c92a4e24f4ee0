"""Work FastAPI repeats for every parameter of every request, done once per parameter.

For each query, header and cookie parameter of a request, FastAPI (0.165) asks again
whether the parameter is a model, which names it goes by and whether its annotation is a
sequence: pure functions of the route's declaration, computed anew every time. On the
catalog listing (a dozen query parameters) that was a sixth of a cached page's CPU.
:func:`install` wraps those four functions of ``fastapi.dependencies.utils`` so each
answer is computed once per parameter and then looked up (ADR 0015).

The answers depend only on objects built when the routes are declared and never changed
afterwards, so a remembered answer is the answer. The wrappers remember by identity and
keep the object they remember for, so an id is never reused while its entry lives.
``tests/platform/test_fastapi_params.py`` checks, for every parameter of every route of
the app, that the remembered answers equal FastAPI's own; a FastAPI release that renames
or re-signs these functions makes :func:`install` raise at startup instead of silently
doing nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import fastapi.dependencies.utils as _utils

# name -> (the parameters FastAPI's function takes, in order)
_WRAPPED: dict[str, tuple[str, ...]] = {
    "_get_param_model": ("field",),
    "_is_json_field": ("field",),
    "_get_param_aliases": ("field", "convert_underscores"),
    "field_annotation_is_sequence": ("annotation",),
}
_MARK = "__soko_remembered__"


def originals() -> dict[str, Callable[..., Any]]:
    """FastAPI's own functions, whether or not :func:`install` ran."""
    found = {}
    for name in _WRAPPED:
        current = getattr(_utils, name)
        found[name] = getattr(current, _MARK, current)
    return found


def _check(name: str, function: Callable[..., Any]) -> None:
    parameters = tuple(inspect.signature(function).parameters)
    if parameters != _WRAPPED[name]:
        raise RuntimeError(
            f"fastapi.dependencies.utils.{name} takes {parameters}, not {_WRAPPED[name]}: "
            "review soko.platform.fastapi_params for this FastAPI release"
        )


def _remembering(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, its answer computed once per subject (a field or an annotation) and
    keyword options, then looked up."""
    remembered: dict[Any, tuple[Any, Any]] = {}

    def wrapper(subject: Any, **options: Any) -> Any:
        key = (id(subject), *options.values()) if options else id(subject)
        entry = remembered.get(key)
        if entry is not None and entry[0] is subject:
            return entry[1]
        answer = original(subject, **options)
        remembered[key] = (subject, answer)
        return answer

    return wrapper


def install() -> None:
    """Wrap FastAPI's per-parameter functions (once; calling again changes nothing)."""
    for name, original in originals().items():
        if hasattr(getattr(_utils, name), _MARK):
            continue
        _check(name, original)
        wrapper = _remembering(original)
        setattr(wrapper, _MARK, original)
        setattr(_utils, name, wrapper)
