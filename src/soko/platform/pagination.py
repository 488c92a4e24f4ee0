"""Lists: ``?limit=&cursor=`` keyset pagination and ``?fields=`` selection.

Every list answers ``{"items": [...], "next_cursor": "..." | null}``. A cursor is opaque
to clients: it holds the sort-key values and id of the last row of the page (base64url
JSON) and an HMAC over them and the list it came from, keyed by ``settings.secret_key``.
A cursor that was altered, or issued for another list or another sort order, answers
the ``invalid-cursor`` problem instead of silently paging through the wrong thing.

Keyset pagination ("rows after this sort key") rather than ``OFFSET``: rows inserted or
deleted while a client pages never shift the window, so no row is skipped or shown
twice, and each page costs an index range scan however deep it is.

A route::

    listing = Keyset("catalog.products", SortKey(Product.created_at, descending=True),
                     id_column=Product.id)
    ProductFields = field_selection(ProductOut)

    @router.get("/products", response_model=Page[ProductOut])
    async def list_products(session: SessionDep, page: PageRequestDep,
                            fields: Annotated[FieldSelection, Depends(ProductFields)]):
        rows, next_cursor = await listing.fetch(session, select(Product), page)
        return page_response([ProductOut.model_validate(r) for r in rows], next_cursor,
                             fields)

Sort columns must be ``NOT NULL``: SQL orders NULLs differently per database and a
keyset comparison with NULL matches nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query, Request
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Row, Select, and_, literal, or_, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import JSONResponse

from soko.platform.errors import InvalidCursor, UnknownField, answers
from soko.platform.runtime import get_runtime

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
# Long enough for several sort keys, short enough that a forged cursor costs nothing.
CURSOR_MAX_LENGTH = 1024
_MAC_BYTES = 16
_KEY_CONTEXT = b"soko/pagination-cursor/v1"

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list."""

    items: list[T]
    next_cursor: str | None = None


# -- cursors ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def cursor_key(secret_key: str) -> bytes:
    """The cursor signing key, derived from the application secret so a cursor MAC can
    never be confused with any other signature made with that secret (derived once per
    secret: every list request needs it)."""
    return hmac.new(secret_key.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _encode_value(value: Any) -> Any:
    # Tagged so each value comes back as the type the column compares against.
    if value is None:
        raise ValueError("keyset sort columns must be NOT NULL")
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return ["f", value.hex()]
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime in a sort key")
        return ["dt", value.isoformat()]
    if isinstance(value, dt.date):
        return ["d", value.isoformat()]
    if isinstance(value, uuid.UUID):
        return ["u", value.hex]
    if isinstance(value, Decimal):
        return ["n", str(value)]
    raise TypeError(f"cannot put a {type(value).__name__} in a cursor")


def _decode_value(raw: Any) -> Any:
    if isinstance(raw, bool | int | str):
        return raw
    if isinstance(raw, list) and len(raw) == 2 and isinstance(raw[1], str):
        tag, text = raw
        decoders: dict[str, Callable[[str], Any]] = {
            "f": float.fromhex,
            "dt": dt.datetime.fromisoformat,
            "d": dt.date.fromisoformat,
            "u": uuid.UUID,
            "n": Decimal,
        }
        if tag in decoders:
            return decoders[tag](text)
    raise ValueError("unknown value in cursor")


def _mac(key: bytes, scope: str, payload: str) -> bytes:
    message = scope.encode() + b"\x00" + payload.encode()
    return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_cursor(values: Sequence[Any], *, scope: str, key: bytes) -> str:
    """An opaque cursor for ``values`` (the last row's sort keys, then its id)."""
    payload = _b64encode(
        json.dumps([_encode_value(v) for v in values], separators=(",", ":")).encode()
    )
    return f"{payload}.{_b64encode(_mac(key, scope, payload))}"


def decode_cursor(cursor: str, *, scope: str, key: bytes, arity: int) -> list[Any]:
    """The values in ``cursor``; raises :class:`InvalidCursor` unless this server issued
    it for ``scope`` and it holds ``arity`` values."""
    invalid = InvalidCursor("The cursor is not valid for this list; start from the first page.")
    if len(cursor) > CURSOR_MAX_LENGTH:
        raise invalid
    payload, dot, signature = cursor.partition(".")
    if not dot or not payload or not signature:
        raise invalid
    try:
        sent_mac = _b64decode(signature)
    except (binascii.Error, ValueError):
        raise invalid from None
    if not hmac.compare_digest(sent_mac, _mac(key, scope, payload)):
        raise invalid
    try:
        raw = json.loads(_b64decode(payload))
        if not isinstance(raw, list) or len(raw) != arity:
            raise invalid
        return [_decode_value(item) for item in raw]
    except (binascii.Error, ValueError, TypeError):
        # Only reachable with a valid MAC, i.e. a cursor format change under the same key.
        raise invalid from None


# -- the ?limit=&cursor= dependency ------------------------------------------------------------


@dataclass(frozen=True)
class PageRequest:
    """What the client asked for: page size and where to resume."""

    limit: int = DEFAULT_LIMIT
    cursor: str | None = None
    signing_key: bytes = field(default=b"", repr=False)


LIMIT_DESCRIPTION = f"Page size, 1 to {MAX_LIMIT}."
CURSOR_DESCRIPTION = "The `next_cursor` of the previous page; omit for the first page."


def page_of(request: Request, limit: int, cursor: str | None) -> PageRequest:
    """The page a request asks for, its ``limit`` and ``cursor`` already validated."""
    secret = get_runtime(request).settings.secret_key.get_secret_value()
    return PageRequest(limit=limit, cursor=cursor or None, signing_key=cursor_key(secret))


@answers(400)  # an unreadable or foreign cursor: invalid-cursor
async def page_request(
    request: Request,
    limit: Annotated[
        int,
        Query(ge=1, le=MAX_LIMIT, description=LIMIT_DESCRIPTION),
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(max_length=CURSOR_MAX_LENGTH, description=CURSOR_DESCRIPTION),
    ] = None,
) -> PageRequest:
    return page_of(request, limit, cursor)


PageRequestDep = Annotated[PageRequest, Depends(page_request)]


# -- keyset queries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SortKey:
    """One column of a list's order. The column must be ``NOT NULL``."""

    column: Any  # a mapped attribute (Product.price) or a Core column
    descending: bool = False

    @property
    def name(self) -> str:
        return str(getattr(self.column, "key", None) or self.column)


class Keyset:
    """The order of one list, and keyset pagination over it.

    ``name`` identifies the list (``"catalog.products"``); add anything that changes
    which rows it holds and that the client cannot see in the URL, such as the owner
    (``f"orders:{customer_id}"``), so a cursor only works where it was issued. The sort
    order is bound into the cursor too. Ties are broken by ``id_column``, in the
    direction of the last sort key, which makes the order total.
    """

    def __init__(
        self,
        name: str,
        *order: SortKey,
        id_column: Any,
        id_descending: bool | None = None,
    ) -> None:
        if id_descending is None:
            id_descending = order[-1].descending if order else False
        self.keys: tuple[SortKey, ...] = (*order, SortKey(id_column, id_descending))
        described = ",".join(
            f"{key.name}:{'desc' if key.descending else 'asc'}" for key in self.keys
        )
        self.scope = f"{name}|{described}"

    def order_by(self) -> list[ColumnElement[Any]]:
        return [key.column.desc() if key.descending else key.column.asc() for key in self.keys]

    def after(self, values: Sequence[Any]) -> ColumnElement[bool]:
        """The rows that come after a row whose sort-key values are ``values``."""
        bound = [
            literal(value, type_=key.column.type)
            for key, value in zip(self.keys, values, strict=True)
        ]
        directions = {key.descending for key in self.keys}
        if len(directions) == 1:
            # A row-value comparison lets PostgreSQL (and SQLite) use one index range scan.
            left = tuple_(*(key.column for key in self.keys))
            right = tuple_(*bound)
            return left < right if self.keys[0].descending else left > right
        # Mixed directions: (a > x) OR (a = x AND b < y) OR (a = x AND b = y AND id > z)...
        branches = []
        for index, key in enumerate(self.keys):
            equal = [k.column == v for k, v in zip(self.keys[:index], bound[:index], strict=True)]
            beyond = key.column < bound[index] if key.descending else key.column > bound[index]
            branches.append(and_(*equal, beyond))
        return or_(*branches)

    def apply(self, statement: Select[Any], page: PageRequest) -> Select[Any]:
        """``statement`` limited to the requested page, plus one row to tell whether
        another page follows. Any ``ORDER BY`` already on it is replaced."""
        statement = statement.order_by(None).order_by(*self.order_by())
        if page.cursor:
            values = decode_cursor(
                page.cursor, scope=self.scope, key=page.signing_key, arity=len(self.keys)
            )
            statement = statement.where(self.after(values))
        return statement.limit(page.limit + 1)

    def sort_values(self, row: Any) -> list[Any]:
        """The sort-key values of ``row``: an ORM object or a result row that selected
        the sort columns."""
        if isinstance(row, Row):
            mapping = row._mapping
            return [mapping[key.column] for key in self.keys]
        return [getattr(row, key.name) for key in self.keys]

    def finish(self, rows: Sequence[T], page: PageRequest) -> tuple[list[T], str | None]:
        """The page's rows and the cursor of the next page (``None`` on the last)."""
        items = list(rows[: page.limit])
        if len(rows) <= page.limit:
            return items, None
        values = self.sort_values(items[-1])
        return items, encode_cursor(values, scope=self.scope, key=page.signing_key)

    async def fetch(
        self, session: AsyncSession, statement: Select[Any], page: PageRequest
    ) -> tuple[list[Any], str | None]:
        """Run ``statement`` for one page: ORM objects when it selects one entity,
        result rows otherwise."""
        paged = self.apply(statement, page)
        descriptions = statement.column_descriptions
        if len(descriptions) == 1 and isinstance(descriptions[0].get("expr"), type):
            rows: Sequence[Any] = (await session.scalars(paged)).all()
        else:
            rows = (await session.execute(paged)).all()
        return self.finish(rows, page)


# -- ?fields= ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSelection:
    """The fields a client asked for; ``None`` means all of them."""

    fields: frozenset[str] | None = None

    def trim(self, item: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
        data = (
            item.model_dump(mode="json", by_alias=True)
            if isinstance(item, BaseModel)
            else dict(item)
        )
        if self.fields is None:
            return data
        return {name: value for name, value in data.items() if name in self.fields}


def _public_names(model: type[BaseModel]) -> list[str]:
    return [
        info.serialization_alias or info.alias or name for name, info in model.model_fields.items()
    ]


FIELDS_MAX_LENGTH = 1000


def fields_description(model: type[BaseModel]) -> str:
    """What ``?fields=`` says of itself for items shaped like ``model``."""
    return (
        f"Comma-separated fields to return for each item, from: {', '.join(_public_names(model))}."
    )


def fields_reader(
    model: type[BaseModel], *, always: Iterable[str] = ("id",)
) -> Callable[[str | None], FieldSelection]:
    """A function reading a ``?fields=a,b`` value for items shaped like ``model``; unknown
    names raise the ``unknown-field`` problem. ``always`` (the id) is always kept."""
    known = _public_names(model)
    known_set = frozenset(known)
    kept = frozenset(name for name in always if name in known_set)

    def read(fields: str | None) -> FieldSelection:
        if fields is None or not fields.strip():
            return FieldSelection(None)
        asked = [name.strip() for name in fields.split(",") if name.strip()]
        unknown = sorted(set(asked) - known_set)
        if unknown:
            raise UnknownField(
                f"Unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}.",
                unknown=unknown,
                allowed=known,
            )
        return FieldSelection(frozenset(asked) | kept)

    return read


def field_selection(
    model: type[BaseModel], *, always: Iterable[str] = ("id",)
) -> Callable[..., Awaitable[FieldSelection]]:
    """A dependency reading ``?fields=a,b`` for items shaped like ``model`` (see
    :func:`fields_reader`)."""
    read = fields_reader(model, always=always)

    # async: a plain function dependency would be sent to a worker thread per request.
    @answers(400)  # a field the items do not have: unknown-field
    async def dependency(fields: str | None = None) -> FieldSelection:
        return read(fields)

    # Set after definition: with postponed annotations FastAPI would evaluate a string
    # annotation in module globals, where this model's field names are not.
    dependency.__annotations__["fields"] = Annotated[
        str | None,
        Query(max_length=FIELDS_MAX_LENGTH, description=fields_description(model)),
    ]
    return dependency


def select_fields(
    items: Iterable[BaseModel | Mapping[str, Any]], selection: FieldSelection
) -> list[dict[str, Any]]:
    return [selection.trim(item) for item in items]


def page_response(
    items: Iterable[BaseModel | Mapping[str, Any]],
    next_cursor: str | None,
    selection: FieldSelection | None = None,
) -> JSONResponse:
    """The page as a response, trimmed to the selected fields. Declare
    ``response_model=Page[ItemOut]`` on the route for the schema: a trimmed item would
    not validate against it, so the response is built here."""
    selection = selection or FieldSelection(None)
    return JSONResponse({"items": select_fields(items, selection), "next_cursor": next_cursor})
