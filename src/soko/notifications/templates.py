"""Message templates: Jinja2 in a sandbox, one file per template and locale.

A template is one Jinja source with named blocks, one per part:

* ``subject``: the email's subject (one line);
* ``text``: the email's plain-text body;
* ``html``: the email's HTML body, rendered with autoescape on;
* ``sms``: the SMS text (optional: a template without it sends no SMS), at most
  :data:`SMS_MAX_SEGMENTS` segments (:func:`sms_segments`);
* ``title``: the in-app notification's title (its body is ``text``).

Bundled defaults live in ``soko/notifications/templates/<locale>/<name>.jinja``; an
administrator's override of one (name, locale) is stored in ``notifications_templates``
and used instead. Sending reads the overrides through the cache (:func:`render`, every
override in one entry, dropped whenever one changes: :data:`TEMPLATES_TAG`), since
every message would otherwise ask the database whether its template was overridden.
Sources are compiled in an immutable sandbox (no attribute access to Python internals,
no imports, no changing the data it is given), twice: with autoescape for the ``html``
block and without for the other parts, which are not HTML. A template is also held to
limits on the size of what it computes, the work it does and the length of what it
writes (see "the sandbox and its limits" below); past one, or on any error it raises,
it is an invalid template (:class:`TemplateProblem`), never a crash.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import resources
from string import Formatter
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, nodes, pass_context
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, Undefined, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.models import TemplateOverride
from soko.platform.db import dialect_insert
from soko.platform.money import minor_units
from soko.platform.runtime import Runtime, invalidate_after_commit

LOCALES = ("en", "sw")
PARTS = ("subject", "text", "html", "sms", "title")
REQUIRED_PARTS = ("subject", "text", "html", "title")
SMS_MAX_SEGMENTS = 3
SOURCE_MAX_LENGTH = 20_000
SUBJECT_MAX_LENGTH = 200

# GSM 03.38: the basic character set, and the extension table (escape + char: 2 septets).
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = set("^{}\\[~]|€\f")


@dataclass(frozen=True, slots=True)
class SmsLength:
    """How an SMS text travels: its encoding, length in septets (GSM-7) or UTF-16 code
    units (UCS-2), and the number of segments it takes."""

    encoding: str
    units: int
    segments: int


def sms_segments(text: str) -> SmsLength:
    """Segments per 3GPP TS 23.038/23.040: GSM-7 takes 160 septets in one segment or
    153 per segment when concatenated (the header takes the rest); any character
    outside GSM-7 makes the whole text UCS-2, 70 code units or 67 per segment. An
    extension character (``€``, ``[``...) costs two septets."""
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text):
        units = sum(2 if ch in GSM7_EXTENSION else 1 for ch in text)
        single, multi, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi, encoding = 70, 67, "UCS-2"
    segments = 1 if units <= single else -(-units // multi)
    return SmsLength(encoding=encoding, units=units, segments=segments)


def format_money(amount_minor: int | None, currency: str | None) -> str:
    if amount_minor is None or not currency:
        return ""
    try:
        places = minor_units(currency)
    except ValueError:
        places = 2
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(amount_minor), 10**places)
    text = f"{whole:,}" + (f".{fraction:0{places}d}" if places else "")
    return f"{currency} {sign}{text}"


# -- the sandbox and its limits ----------------------------------------------------------------
#
# A template is code an administrator writes, run in the API (previews and saves) and in
# the workers (every message). The sandbox keeps it away from Python's internals, but not
# from work: ``{{ "a" * 10**9 }}`` takes gigabytes, two nested ``range(99999)`` loops take
# minutes, and either stops the process answering. So a template is also held to limits,
# each of which fails the render with a :class:`SecurityError` (an invalid template):
#
# * no value it computes holds more than VALUE_MAX_SIZE characters or items: the
#   operators that can multiply a size (``*``, ``**``, ``+``, ``%``, ``~``) and the
#   methods and filters that pad, repeat or join (``center``, ``ljust``, ``indent``,
#   ``replace``, ``join``, ``format``...) are checked *before* they run, from their
#   operands, and every other result after;
# * it takes at most STEPS_MAX steps (loop rounds, calls, filters, checked operators),
#   which bounds its time, and handles at most WORK_MAX characters in all (every value
#   produced or written, including what loops write again and again into ``{% set %}``
#   blocks), which bounds its memory;
# * one rendered part is at most RENDERED_MAX_LENGTH characters.
#
# The budgets are for one render of all the parts together. They sit far above what a
# message needs (a bundled template takes a handful of steps and a few hundred characters
# of work). The environment is also immutable (no ``list.append``, no ``dict.clear``: the
# sample data is shared by every preview), recursive loops are refused (their rounds
# could not be counted), and ``lipsum``, the one global that generates text, is gone.

VALUE_MAX_SIZE = 100_000
RENDERED_MAX_LENGTH = 100_000
STEPS_MAX = 20_000
WORK_MAX = 2_000_000
# An integer of VALUE_MAX_SIZE decimal digits.
_INT_MAX_BITS = math.ceil(VALUE_MAX_SIZE * math.log2(10))


@dataclass(slots=True)
class _Budget:
    """What one render may still spend."""

    steps: int = STEPS_MAX
    work: int = WORK_MAX

    @property
    def spent(self) -> bool:
        return self.steps < 0 or self.work < 0


# The budget of the render in progress; None while compiling, when only the size limits
# apply (constant folding runs filters then).
_BUDGET: ContextVar[_Budget | None] = ContextVar("soko_template_budget", default=None)


def _spend(*, steps: int = 0, work: int = 0) -> None:
    budget = _BUDGET.get()
    if budget is None:
        return
    budget.steps -= steps
    budget.work -= work
    if budget.steps < 0:
        raise SecurityError(
            f"the template takes more than {STEPS_MAX} steps (loop rounds, calls, filters)"
        )
    if budget.work < 0:
        raise SecurityError(f"the template handles more than {WORK_MAX} characters in all")


def _too_big(what: str = "a value") -> SecurityError:
    return SecurityError(
        f"the template makes {what} of more than {VALUE_MAX_SIZE} characters or items"
    )


def _is_nested(value: Any) -> bool:
    return not isinstance(value, Undefined) and isinstance(value, str | bytes | Collection)


def _measure(value: Any, limit: int = VALUE_MAX_SIZE) -> tuple[int, int]:
    """The size of ``value`` and how deeply it nests. The size of a string is its length;
    of a collection, its number of items plus the sizes of the strings and collections
    in it, however deep (the same list twice counts twice, as it prints twice); of
    anything else, 1. Counting stops once past ``limit``, so it costs about ``limit``
    steps at most, even on a huge value."""
    if isinstance(value, str | bytes | bytearray):
        return len(value), 0
    if not _is_nested(value):
        return 1, 0
    total = 0
    depth = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending and total <= limit:
        item, level = pending.pop()
        depth = max(depth, level)
        if isinstance(item, str | bytes | bytearray | range):
            total += len(item)
            continue
        total += len(item)
        if total > limit:
            break
        children = (
            [part for pair in item.items() for part in pair] if isinstance(item, Mapping) else item
        )
        pending.extend((child, level + 1) for child in children if _is_nested(child))
    return total, depth


def _size(value: Any) -> int:
    return _measure(value)[0]


def _checked(value: Any, what: str = "a value") -> int:
    """The size of ``value``, spent as work; refused past VALUE_MAX_SIZE."""
    size = _size(value)
    _spend(work=size)
    if size > VALUE_MAX_SIZE:
        raise _too_big(what)
    return size


def _at_most(number: Any, what: str) -> None:
    """Refuse an integer argument (a width, a count) that would make a value too big."""
    if isinstance(number, int) and number > VALUE_MAX_SIZE:
        raise SecurityError(f"{what} {number} is more than {VALUE_MAX_SIZE}")


def _estimated(size: int, what: str = "a value") -> None:
    if size > VALUE_MAX_SIZE:
        raise _too_big(what)


def _argument(extra: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    """A filter's or method's argument given by position (after the value) or name."""
    if index < len(extra):
        return extra[index]
    return kwargs.get(name)


def _bounded_items(iterable: Any) -> list[Any]:
    """``iterable`` as a list, refused as soon as its items add up past VALUE_MAX_SIZE (a
    lazy ``map`` can yield many large strings)."""
    items: list[Any] = []
    total = 0
    for item in iterable:
        total += max(_size(item), 1)
        if total > VALUE_MAX_SIZE:
            raise _too_big("a list")
        items.append(item)
    _spend(work=total)
    return items


# printf-style conversions (``%-10s``, ``%.2f``, ``%(name)s``), for ``%`` and ``format``.
_PRINTF_CONVERSION = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")
_DIGITS = re.compile(r"\d+")


def _check_printf(template: str | bytes, values: Any) -> None:
    """``template % values`` would stay small: no width or precision from the values
    (``%*d``), none past VALUE_MAX_SIZE, and not so many conversions of large values."""
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    conversions = 0
    widest = 0
    for match in _PRINTF_CONVERSION.finditer(text):
        for number in match.groups():
            if number == "*":
                raise SecurityError("a width or precision may not come from the values (%*)")
            if number:
                widest = max(widest, int(number) if len(number) < 10 else VALUE_MAX_SIZE + 1)
        conversions += 1
    _estimated(len(text) + conversions * (widest + _size(values)), "a formatted string")


def _check_format(template: str, values: Any) -> None:
    """``template.format(...)`` would stay small: widths and precisions written in the
    template only (``{:{}}`` is refused), none past VALUE_MAX_SIZE, and not so many
    fields of large values."""
    fields = 0
    widest = 0
    for _text, field, spec, _conversion in Formatter().parse(template):
        if field is None:
            continue
        fields += 1
        if spec and "{" in spec:
            raise SecurityError("a format field's width may not come from the arguments")
        for number in _DIGITS.findall(spec or ""):
            widest = max(widest, int(number) if len(number) < 10 else VALUE_MAX_SIZE + 1)
    _estimated(len(template) + fields * (widest + _size(values)), "a formatted string")


def _replaced_size(text: Any, old: Any, new: Any, count: Any) -> int:
    if not isinstance(text, str | bytes) or not isinstance(old, str | bytes):
        return _size(text)
    if not isinstance(new, str | bytes):
        return len(text)
    hits = len(text) + 1 if not old else text.count(old)  # type: ignore[arg-type]
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _check_operation(operator: str, left: Any, right: Any) -> None:
    """Refuse ``left <operator> right`` before it runs if its result would be too big."""
    if operator == "**":
        growing = isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
        if growing and (right > _INT_MAX_BITS or right * math.log2(abs(left)) > _INT_MAX_BITS):
            raise _too_big("a number")
    elif operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > _INT_MAX_BITS:
                raise _too_big("a number")
        elif isinstance(right, int) and right > 0 and _is_nested(left):  # "ab" * 3, [1] * 3
            _estimated(_checked(left) * right)
        elif isinstance(left, int) and left > 0 and _is_nested(right):
            _estimated(_checked(right) * left)
    elif operator == "+":
        if _is_nested(left) and _is_nested(right):
            _estimated(_checked(left) + _checked(right))
    elif operator == "%" and isinstance(left, str | bytes):
        _checked(right)
        _check_printf(left, right)


# Methods of strings that can make a string much longer than the one they are called on.
_STRING_METHODS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "translate"}
)


# What Jinja itself passes to every call inside a loop or block (the variables set there,
# for functions that take the context); not the template's arguments.
_JINJA_KEYWORDS = frozenset({"_loop_vars", "_block_vars"})


def _checked_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Check a call's arguments; returns the arguments to call with (a lazy iterable
    given to ``join`` is read here, within the limits)."""
    kwargs = {key: value for key, value in kwargs.items() if key not in _JINJA_KEYWORDS}
    for value in (*args, *kwargs.values()):
        _checked(value, "an argument")
    wrapped = getattr(obj, "__wrapped__", None)
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if getattr(wrapped, "__name__", "") in ("format", "format_map"):
        # The sandbox's safe str.format (SandboxedEnvironment.wrap_str_format).
        template = getattr(wrapped, "__self__", None)
        if isinstance(template, str):
            _check_format(template, (args, kwargs))
    elif isinstance(owner, str | bytes | bytearray) and name in _STRING_METHODS:
        text = owner
        if name in ("center", "ljust", "rjust", "zfill"):
            _at_most(_argument(args, kwargs, 0, "width"), "a width of")
        elif name == "expandtabs":
            tabsize = _argument(args, kwargs, 0, "tabsize")
            tabsize = 8 if tabsize is None else tabsize
            if isinstance(tabsize, int):
                tab = "\t" if isinstance(text, str) else b"\t"
                _estimated(len(text) + text.count(tab) * max(tabsize, 0))  # type: ignore[arg-type]
        elif name == "replace" and len(args) >= 2:
            _estimated(_replaced_size(text, args[0], args[1], _argument(args, kwargs, 2, "count")))
        elif name == "join" and args:
            items = _bounded_items(args[0])
            _estimated(len(text) * max(len(items) - 1, 0) + sum(_size(item) for item in items))
            args = (items, *args[1:])
        elif name == "translate" and args and isinstance(text, str):
            table = args[0]
            entries = table.values() if isinstance(table, Mapping) else table
            longest = max(
                (len(entry) for entry in _bounded_items(entries) if isinstance(entry, str)),
                default=1,
            )
            _estimated(len(text) * max(longest, 1))
    elif isinstance(owner, int) and name == "to_bytes":
        _at_most(_argument(args, kwargs, 0, "length"), "a length of")
    return args


def _produced(value: Any) -> Any:
    """``value``, just made by the template: spent as work, refused if too big."""
    _checked(value)
    return value


# -- filters: each builtin one is checked before it runs (see _guarded_filter) -----------------

FilterCheck = Callable[[Any, tuple[Any, ...], dict[str, Any]], None]


def _check_center(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    _at_most(_argument(extra, kwargs, 0, "width"), "a width of")


def _check_indent(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    width = _argument(extra, kwargs, 0, "width")
    width = 4 if width is None else width
    if isinstance(width, int):
        _at_most(width, "an indent of")
        indent = max(width, 0)
    else:
        indent = _size(width)
    if isinstance(value, str):
        _estimated(indent + len(value) + (value.count("\n") + 1) * indent)


def _check_format_filter(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if isinstance(value, str):
        _check_printf(value, kwargs or extra)


def _check_replace(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    old = _argument(extra, kwargs, 0, "old")
    new = _argument(extra, kwargs, 1, "new")
    text = value if isinstance(value, str) else str(value)
    _estimated(_replaced_size(text, old, new, _argument(extra, kwargs, 2, "count")))


def _check_batch(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    _at_most(_argument(extra, kwargs, 0, "linecount"), "a batch of")


def _check_slice(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    _at_most(_argument(extra, kwargs, 0, "slices"), "a number of slices of")


def _check_wordwrap(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    width = _argument(extra, kwargs, 0, "width")
    wrapstring = _argument(extra, kwargs, 2, "wrapstring")
    if isinstance(value, str) and isinstance(wrapstring, str):
        # A line holds at least half the width, or a whole word, on average.
        width = width if isinstance(width, int) and width > 0 else 79
        lines = 2 * len(value) // width + value.count("\n") + 2
        _estimated(len(value) + lines * len(wrapstring))


def _check_urlize(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # Every word may become a link carrying the rel and target given.
    target = _argument(extra, kwargs, 2, "target")
    rel = _argument(extra, kwargs, 3, "rel")
    added = sum(len(text) for text in (target, rel) if isinstance(text, str))
    if isinstance(value, str) and added:
        _estimated(len(value) + len(value.split()) * added)


def _check_tojson(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    indent = _argument(extra, kwargs, 0, "indent")
    if indent is not None:
        width = indent if isinstance(indent, int) else _size(indent)
        _at_most(width, "an indent of")
        size, depth = _measure(value)
        _estimated(size * (1 + depth * max(width, 0)))


def _check_pprint(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    size, depth = _measure(value)
    _estimated(size * (1 + depth))


def _check_sum(value: Any, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # Summing lists from an empty list copies the total again at every item.
    start = _argument(extra, kwargs, 1, "start")
    if start is not None and not isinstance(start, int | float):
        raise SecurityError("sum starts from a number only")


_FILTER_CHECKS: dict[str, FilterCheck] = {
    "center": _check_center,
    "indent": _check_indent,
    "format": _check_format_filter,
    "replace": _check_replace,
    "batch": _check_batch,
    "slice": _check_slice,
    "wordwrap": _check_wordwrap,
    "urlize": _check_urlize,
    "tojson": _check_tojson,
    "pprint": _check_pprint,
    "sum": _check_sum,
}


def _guarded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a filter) within the limits: a step; its value and arguments no
    bigger than a value may be; its own check (``_FILTER_CHECKS``) before it runs; its
    result checked after. ``join`` reads a lazy value here, within the limits."""
    # A filter marked pass_context (or eval_context, environment) takes that first.
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0
    check = _FILTER_CHECKS.get(name)

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _spend(steps=1)
        for value in (*args[skip:], *kwargs.values()):
            _checked(value, "an argument")
        if len(args) > skip:
            value, extra = args[skip], args[skip + 1 :]
            if name == "join":
                items = _bounded_items(value)
                joiner = _argument(extra, kwargs, 0, "d")
                between = _size(joiner) if joiner is not None else 0
                _estimated(between * max(len(items) - 1, 0) + sum(_size(i) for i in items))
                args = (*args[:skip], items, *extra)
            elif check is not None:
                check(value, extra, kwargs)
        return _produced(function(*args, **kwargs))

    return guarded


# Filters the compiler adds (see _Metering); the colon keeps templates from naming them.
_LOOP_FILTER = "soko:loop"
_CONCAT_FILTER = "soko:concat"


@pass_context
def _metered_loop(context: Context, iterable: Any, literal: int) -> Iterator[Any]:
    """``iterable``, each round a step plus the ``literal`` text the loop body writes."""
    for item in iterable:
        _spend(steps=1, work=literal + 1)
        yield item


@pass_context
def _metered_concat(context: Context, operands: list[Any]) -> Any:
    """``a ~ b ~ ...``, refused before joining if the result would be too big. Joined
    as the compiler would: escaping (and marked safe) where autoescape is on."""
    _estimated(sum(_checked(operand) for operand in operands), "a string")
    eval_ctx = context.eval_ctx
    join = markup_join if eval_ctx.volatile or eval_ctx.autoescape else str_join
    return _produced(join(operands))


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    """Every ``{{ ... }}`` written, at render time: spent as work, refused if too big
    (before it is turned into a string). Taking the context keeps the compiler from
    writing constant expressions out at compile time, unmetered."""
    return _produced(value)


class _Metering(NodeTransformer):
    """Rewrites a parsed template so its loops and ``~`` are metered: the iterable of a
    ``for`` goes through :func:`_metered_loop`, a ``~`` through :func:`_metered_concat`
    (neither calls nor joins pass through the sandbox's hooks otherwise)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:  # noqa: N802 - Jinja's names
        if node.recursive:
            raise TemplateSyntaxError("recursive loops are not allowed", node.lineno)
        self.generic_visit(node)
        literal = sum(
            len(data.data)
            for statement in node.body
            for data in statement.find_all(nodes.TemplateData)
        )
        node.iter = nodes.Filter(
            node.iter, _LOOP_FILTER, [nodes.Const(literal)], [], None, None, lineno=node.lineno
        )
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802 - Jinja's names
        self.generic_visit(node)
        operands = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(operands, _CONCAT_FILTER, [], [], None, None, lineno=node.lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with the operators that can make a value huge checked first, and
    every call a step whose arguments and result are checked."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _spend(steps=1)
        _check_operation(operator, left, right)
        return _produced(super().call_binop(context, operator, left, right))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _spend(steps=1)
        args = _checked_call(obj, args, kwargs)
        return _produced(super().call(context, obj, *args, **kwargs))


def _environment(autoescape: bool) -> _Sandbox:
    env = _Sandbox(
        autoescape=autoescape,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        finalize=_finalize,
    )
    env.filters["money"] = format_money
    env.filters = {name: _guarded_filter(name, f) for name, f in env.filters.items()}
    env.filters[_LOOP_FILTER] = _metered_loop
    env.filters[_CONCAT_FILTER] = _metered_concat
    env.globals.pop("lipsum", None)
    return env


_PLAIN = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


@functools.lru_cache(maxsize=512)
def _compiled(source: str, autoescape: bool) -> Any:
    environment = _HTML if autoescape else _PLAIN
    # Compiling folds constant expressions (filters included): under a budget too.
    token = _BUDGET.set(_Budget())
    try:
        tree = environment.parse(source)
        _Metering().visit(tree)
        tree.set_environment(environment)
        return environment.from_string(tree)
    finally:
        _BUDGET.reset(token)


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str
    title: str
    sms: str | None


def _block(source: str, part: str, context: dict[str, Any]) -> str | None:
    template = _compiled(source, part == "html")
    block = template.blocks.get(part)
    if block is None:
        return None
    pieces: list[str] = []
    length = 0
    for piece in block(template.new_context(context)):
        length += len(piece)
        if length > RENDERED_MAX_LENGTH:
            raise SecurityError(f"the part is longer than {RENDERED_MAX_LENGTH} characters")
        pieces.append(piece)
    return "".join(pieces).strip()


def render_source(source: str, context: dict[str, Any]) -> Rendered:
    """Render every part of ``source``; raises :class:`TemplateProblem` listing what is
    wrong (a syntax error, an undefined name, a part over the sandbox's limits or failing
    in any other way, a missing part, a part too long).

    Any exception a part raises is the template's fault, so it is reported, never let
    through: the sandbox's own (SecurityError, past a limit), Jinja's (UndefinedError,
    a syntax error) and Python's, which the template's code can raise through the data
    it is given (``{{ 1 / 0 }}``, ``{{ "%d" % "x" }}``, ``range(10**8)``, a recursive
    macro)."""
    errors: list[dict[str, str]] = []
    if len(source) > SOURCE_MAX_LENGTH:
        raise TemplateProblem([{"part": "source", "message": "the template is too long"}])
    parts: dict[str, str | None] = {}
    budget = _Budget()  # one for all the parts
    token = _BUDGET.set(budget)
    try:
        for part in PARTS:
            try:
                parts[part] = _block(source, part, context)
            except Exception as exc:
                errors.append({"part": part, "message": _failure(exc)})
                if part == PARTS[0] or budget.spent:
                    break  # a syntax error fails every part alike, as a spent budget
    finally:
        _BUDGET.reset(token)
    if errors:
        raise TemplateProblem(errors)
    for part in REQUIRED_PARTS:
        if not parts.get(part):
            errors.append({"part": part, "message": f"the {part!r} block is missing or empty"})
    subject = parts.get("subject") or ""
    if "\n" in subject or "\r" in subject or len(subject) > SUBJECT_MAX_LENGTH:
        errors.append(
            {"part": "subject", "message": f"one line of at most {SUBJECT_MAX_LENGTH} characters"}
        )
    sms = parts.get("sms") or None
    if sms is not None:
        length = sms_segments(sms)
        if length.segments > SMS_MAX_SEGMENTS:
            errors.append(
                {
                    "part": "sms",
                    "message": f"{length.segments} segments ({length.units} {length.encoding} "
                    f"units); at most {SMS_MAX_SEGMENTS}",
                }
            )
    if errors:
        raise TemplateProblem(errors)
    return Rendered(
        subject=subject,
        text=parts["text"] or "",
        html=parts["html"] or "",
        title=(parts["title"] or "")[:200],
        sms=sms,
    )


_MESSAGE_MAX_LENGTH = 300


def _failure(exc: Exception) -> str:
    """What went wrong, for the administrator: the kind of error, the template's line if
    known, and the message, cut short (some quote the value at fault, which may be
    long)."""
    line = getattr(exc, "lineno", None) if isinstance(exc, TemplateError) else None
    where = f" (line {line})" if line else ""
    message = f"{type(exc).__name__}{where}: {exc}"
    if len(message) > _MESSAGE_MAX_LENGTH:
        message = message[: _MESSAGE_MAX_LENGTH - 1] + "…"
    return message


class TemplateProblem(ValueError):
    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['part']}: {e['message']}" for e in errors))


# -- where sources come from -------------------------------------------------------------------


def template_names() -> list[str]:
    """Every bundled template's name, sorted."""
    folder = resources.files("soko.notifications") / "templates" / "en"
    return sorted(
        entry.name.removesuffix(".jinja")
        for entry in folder.iterdir()
        if entry.name.endswith(".jinja")
    )


@functools.lru_cache(maxsize=256)
def bundled_source(name: str, locale: str) -> str | None:
    if locale not in LOCALES or not name.replace(".", "").replace("_", "").isalnum():
        return None
    if not name.isascii():
        return None
    path = resources.files("soko.notifications") / "templates" / locale / f"{name}.jinja"
    try:
        return path.read_text("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


def override_key(name: str, locale: str) -> str:
    return f"{name}:{locale}"


def _locales_tried(locale: str) -> tuple[str, ...]:
    return (locale,) if locale == "en" else (locale, "en")


def _chosen_source(name: str, locale: str, overrides: Mapping[str, str]) -> str | None:
    """The source used for (name, locale) given the ``overrides`` by key: the override
    if any, else the bundled one; a locale without the template falls back to English."""
    for tried in _locales_tried(locale):
        override = overrides.get(override_key(name, tried))
        source = override if override is not None else bundled_source(name, tried)
        if source is not None:
            return source
    return None


@functools.lru_cache(maxsize=1)
def _overrides_of_keys_statement() -> Any:
    overrides: Any = TemplateOverride.__table__
    return select(overrides.c.key, overrides.c.source).where(
        overrides.c.key.in_(bindparam("keys", expanding=True))
    )


async def effective_source(session: AsyncSession, name: str, locale: str) -> str | None:
    """The source used for (name, locale), read in ``session``: the override if any,
    else the bundled one; a locale without the template falls back to English."""
    keys = [override_key(name, tried) for tried in _locales_tried(locale)]
    rows = await session.execute(_overrides_of_keys_statement(), {"keys": keys})
    return _chosen_source(name, locale, {key: source for key, source in rows})


# The cache tag of the overrides; every change to one invalidates it.
TEMPLATES_TAG = "notifications:templates"
_OVERRIDES_CACHE_KEY = "notifications:template-overrides:v1"
# A safety net: every change invalidates the entry.
_OVERRIDES_TTL_SECONDS = 300.0


@functools.lru_cache(maxsize=1)
def _all_overrides_statement() -> Any:
    overrides: Any = TemplateOverride.__table__
    return select(overrides.c.key, overrides.c.source)


async def _overrides(runtime: Runtime) -> dict[str, str]:
    """Every override's source by key, from the cache. Read on a connection of its own,
    never a caller's transaction, whose uncommitted writes must not reach the cache."""

    async def load() -> dict[str, str]:
        async with runtime.db.reading() as connection:
            rows = await connection.execute(_all_overrides_statement())
            return {key: source for key, source in rows}

    found: dict[str, str] = await runtime.cache.get_or_set(
        _OVERRIDES_CACHE_KEY, load, ttl=_OVERRIDES_TTL_SECONDS, tags=(TEMPLATES_TAG,), near=True
    )
    return found


def overrides_changed(session: AsyncSession) -> None:
    """Call after changing an override in ``session``: sending sees it once it commits."""
    invalidate_after_commit(session, TEMPLATES_TAG)


async def render(runtime: Runtime, name: str, locale: str, context: dict[str, Any]) -> Rendered:
    """Render the template (name, locale) a message is sent with: the override if any,
    else the bundled one; a locale without the template falls back to English."""
    source = _chosen_source(name, locale, await _overrides(runtime))
    if source is None:
        raise LookupError(f"no template named {name!r}")
    return render_source(source, context)


# Sample data for previews and validation: every name any bundled template uses.
SAMPLE_CONTEXT: dict[str, Any] = {
    "app": {"name": "Soko", "url": "https://soko.example"},
    "recipient": {"name": "Wanjiku Kamau"},
    "order": {
        "id": str(uuid.UUID(int=1)),
        "number": "SK-20300101-0001",
        "total_minor": 250_000,
        "currency": "KES",
        "status": "paid",
        "reason": "The buyer changed their mind",
        "carrier": "G4S",
        "tracking_number": "G4S123456",
        "refund_minor": 250_000,
    },
    "dispute": {
        "id": str(uuid.UUID(int=2)),
        "outcome": "refund",
        "refund_minor": 120_000,
        "currency": "KES",
    },
    "store": {"name": "Duka la Mama", "reason": "Listing counterfeit goods"},
    "payment": {"amount_minor": 250_000, "currency": "KES"},
    "sign_in": {"device": "Chrome on Android", "at": "2030-01-01T08:30:00+00:00"},
}


async def store_override(
    session: AsyncSession, key: str, source: str, user_id: uuid.UUID | None, now: dt.datetime
) -> None:
    """Store an administrator's source for ``key`` (an upsert that counts versions, so
    two concurrent saves both land, the later one winning)."""
    insert = dialect_insert(session)
    statement = insert(TemplateOverride).values(
        key=key, source=source, version=1, updated_at=now, updated_by=user_id
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["key"],
            set_={
                "source": source,
                "version": TemplateOverride.version + 1,
                "updated_at": now,
                "updated_by": user_id,
            },
        )
    )
