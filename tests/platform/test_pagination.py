from __future__ import annotations

import base64
import datetime as dt
import json
import random
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Annotated, Any

import httpx2
import pytest
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from sqlalchemy import Integer, String, Uuid, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from soko.platform.db import UTCDateTime
from soko.platform.errors import InvalidCursor
from soko.platform.ids import uuid7
from soko.platform.pagination import (
    FieldSelection,
    Keyset,
    Page,
    PageRequest,
    PageRequestDep,
    SortKey,
    cursor_key,
    decode_cursor,
    encode_cursor,
    field_selection,
    page_response,
)
from soko.platform.runtime import Runtime, SessionDep

KEY = cursor_key("a-secret-that-is-long-enough-for-tests-000000")
OTHER_KEY = cursor_key("another-secret-that-is-long-enough-111111111")


# A table of its own (not on the application's metadata, so it never reaches migrations).
class ListingBase(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime(), uuid.UUID: Uuid()}


class Listing(ListingBase):
    __tablename__ = "test_pagination_listing"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    title: Mapped[str] = mapped_column(String(100))
    price: Mapped[int] = mapped_column(Integer)
    listed_at: Mapped[dt.datetime] = mapped_column()


class ListingOut(BaseModel):
    id: uuid.UUID
    title: str
    price: int
    listed_at: dt.datetime
    seller_name: str = Field(default="Mama Njeri", serialization_alias="seller")


BASE_TIME = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
async def listings(runtime: Runtime) -> AsyncIterator[Runtime]:
    async with runtime.db.engine.begin() as conn:
        await conn.run_sync(ListingBase.metadata.drop_all)
        await conn.run_sync(ListingBase.metadata.create_all)
    yield runtime
    async with runtime.db.engine.begin() as conn:
        await conn.run_sync(ListingBase.metadata.drop_all)


async def add_listings(runtime: Runtime, rows: list[tuple[str, int, int]]) -> list[Listing]:
    """Insert (title, price, minutes after BASE_TIME) rows."""
    made = [
        Listing(title=title, price=price, listed_at=BASE_TIME + dt.timedelta(minutes=minutes))
        for title, price, minutes in rows
    ]
    async with runtime.db.transaction() as session:
        session.add_all(made)
    return made


async def fetch_page(
    runtime: Runtime, keyset: Keyset, page: PageRequest, statement: Any = None
) -> tuple[list[Any], str | None]:
    # One transaction per page, as one request would have.
    async with runtime.db.transaction() as session:
        return await keyset.fetch(
            session, select(Listing) if statement is None else statement, page
        )


async def walk(
    runtime: Runtime, keyset: Keyset, limit: int, between_pages: Any = None
) -> list[list[Listing]]:
    pages: list[list[Listing]] = []
    cursor: str | None = None
    while True:
        page = PageRequest(limit=limit, cursor=cursor, signing_key=KEY)
        items, cursor = await fetch_page(runtime, keyset, page)
        pages.append(items)
        assert len(items) <= limit
        if cursor is None:
            return pages
        assert len(items) == limit
        if between_pages is not None:
            await between_pages(len(pages))
        assert len(pages) < 1000


# -- cursors ------------------------------------------------------------------------------------


def test_cursor_round_trip_keeps_types() -> None:
    values = [
        dt.datetime(2030, 5, 1, 12, 30, 15, 123456, tzinfo=dt.UTC),
        dt.date(2030, 5, 1),
        uuid7(),
        Decimal("12.50"),
        42,
        "Nairobi",
        True,
        0.1,
    ]
    cursor = encode_cursor(values, scope="catalog.products|x", key=KEY)
    assert decode_cursor(cursor, scope="catalog.products|x", key=KEY, arity=len(values)) == values
    restored = decode_cursor(cursor, scope="catalog.products|x", key=KEY, arity=len(values))
    assert [type(v) for v in restored] == [type(v) for v in values]


def test_cursor_refuses_nulls_and_naive_times() -> None:
    with pytest.raises(ValueError):
        encode_cursor([None], scope="s", key=KEY)
    with pytest.raises(ValueError):
        encode_cursor([dt.datetime(2030, 1, 1)], scope="s", key=KEY)


def _tamper_payload(cursor: str) -> str:
    """The same cursor with one digit of its values changed and the MAC kept."""
    payload, _, mac = cursor.partition(".")
    text = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    json.loads(text)
    at = next(i for i, char in enumerate(text) if char.isdigit())
    text = text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1 :]
    forged = base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()
    return f"{forged}.{mac}"


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(_tamper_payload, id="altered-values"),
        pytest.param(lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"), id="altered-mac"),
        pytest.param(lambda c: c.partition(".")[0], id="no-mac"),
        pytest.param(lambda c: "." + c.partition(".")[2], id="no-payload"),
        pytest.param(lambda c: "not a cursor", id="garbage"),
        pytest.param(lambda c: c + "!!", id="bad-base64"),
        pytest.param(lambda c: c + "A" * 2000, id="too-long"),
        pytest.param(lambda c: "", id="empty"),
    ],
)
def test_altered_cursors_are_refused(forge: Any) -> None:
    cursor = encode_cursor([5, "x"], scope="orders", key=KEY)
    with pytest.raises(InvalidCursor):
        decode_cursor(forge(cursor), scope="orders", key=KEY, arity=2)


def test_foreign_cursors_are_refused() -> None:
    cursor = encode_cursor([5, "x"], scope="orders:customer-a", key=KEY)
    assert decode_cursor(cursor, scope="orders:customer-a", key=KEY, arity=2) == [5, "x"]
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor, scope="orders:customer-b", key=KEY, arity=2)
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor, scope="orders:customer-a", key=OTHER_KEY, arity=2)
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor, scope="orders:customer-a", key=KEY, arity=3)


def test_sort_order_is_bound_into_the_scope() -> None:
    newest = Keyset("listings", SortKey(Listing.listed_at, descending=True), id_column=Listing.id)
    oldest = Keyset("listings", SortKey(Listing.listed_at), id_column=Listing.id)
    by_price = Keyset("listings", SortKey(Listing.price), id_column=Listing.id)
    assert len({newest.scope, oldest.scope, by_price.scope}) == 3


# -- keyset queries on the real databases -------------------------------------------------------

ORDERS = {
    "newest": (SortKey(Listing.listed_at, descending=True),),
    "oldest": (SortKey(Listing.listed_at),),
    "cheapest-then-newest": (SortKey(Listing.price), SortKey(Listing.listed_at, descending=True)),
    "dearest-then-title": (SortKey(Listing.price, descending=True), SortKey(Listing.title)),
    "id-only": (),
}


def python_order(rows: list[Listing], order: tuple[SortKey, ...]) -> list[uuid.UUID]:
    ordered = sorted(rows, key=lambda r: r.id, reverse=order[-1].descending if order else False)
    for key in reversed(order):
        ordered.sort(key=lambda r, k=key: getattr(r, k.name), reverse=key.descending)
    return [r.id for r in ordered]


@pytest.mark.parametrize("order_name", list(ORDERS))
@pytest.mark.parametrize("limit", [1, 7, 100])
async def test_walking_every_page_matches_the_full_sort(
    listings: Runtime, order_name: str, limit: int
) -> None:
    rng = random.Random(20300101)
    # Few distinct prices and times, so most rows tie on the sort keys.
    rows = [(f"item {i:03d}", rng.choice([100, 250, 999]), rng.randrange(5)) for i in range(60)]
    made = await add_listings(listings, rows)
    order = ORDERS[order_name]
    keyset = Keyset("listings", *order, id_column=Listing.id)
    pages = await walk(listings, keyset, limit)
    seen = [row.id for page in pages for row in page]
    assert seen == python_order(made, order)
    assert len(pages) == -(-60 // limit)


async def test_pages_stay_stable_under_concurrent_inserts_and_deletes(listings: Runtime) -> None:
    originals = await add_listings(
        listings, [(f"item {i:03d}", 100 + i % 3, i % 4) for i in range(40)]
    )
    keyset = Keyset("listings", SortKey(Listing.listed_at, descending=True), id_column=Listing.id)
    inserted: list[Listing] = []

    async def meanwhile(page_number: int) -> None:
        # Another seller lists items newer than everything (before the cursor) and older
        # than everything (after it), and also items tying with existing rows.
        inserted.extend(
            await add_listings(
                listings,
                [
                    (f"new {page_number}", 1, 10_000 + page_number),
                    (f"old {page_number}", 1, -10_000 - page_number),
                    (f"tie {page_number}", 1, page_number % 4),
                ],
            )
        )

    pages = await walk(listings, keyset, 6, between_pages=meanwhile)
    seen = [row.id for page in pages for row in page]
    assert len(seen) == len(set(seen)), "a row was shown twice"
    assert {row.id for row in originals} <= set(seen), "a row that existed throughout was skipped"
    # Rows older than the whole list were inserted after the cursor, so they show up.
    assert {row.id for row in inserted if row.title.startswith("old")} <= set(seen)
    # Newer rows sort before the cursor and are never shown mid-walk.
    assert not {row.id for row in inserted if row.title.startswith("new")} & set(seen)
    # And the order is still the list's order.
    times = [row.listed_at for page in pages for row in page]
    assert times == sorted(times, reverse=True)


async def test_a_deleted_cursor_row_does_not_break_the_walk(listings: Runtime) -> None:
    made = await add_listings(listings, [(f"item {i}", 1, i) for i in range(10)])
    keyset = Keyset("listings", SortKey(Listing.listed_at), id_column=Listing.id)
    first, cursor = await fetch_page(listings, keyset, PageRequest(limit=3, signing_key=KEY))
    async with listings.db.transaction() as writer:
        await writer.execute(delete(Listing).where(Listing.id == first[-1].id))
    rest, _ = await fetch_page(
        listings, keyset, PageRequest(limit=3, cursor=cursor, signing_key=KEY)
    )
    assert [r.id for r in rest] == [m.id for m in made[3:6]]


async def test_rows_selected_as_columns(listings: Runtime) -> None:
    await add_listings(listings, [(f"item {i}", 5 - i % 2, i) for i in range(5)])
    keyset = Keyset("listings", SortKey(Listing.price), id_column=Listing.id)
    statement = select(Listing.id, Listing.price, Listing.title)
    first, cursor = await fetch_page(
        listings, keyset, PageRequest(limit=2, signing_key=KEY), statement
    )
    second, _ = await fetch_page(
        listings, keyset, PageRequest(limit=2, cursor=cursor, signing_key=KEY), statement
    )
    assert [r.price for r in first + second] == [4, 4, 5, 5]
    assert len({r.id for r in first + second}) == 4


# -- over HTTP ----------------------------------------------------------------------------------

NEWEST = Keyset("test.listings", SortKey(Listing.listed_at, descending=True), id_column=Listing.id)
ListingFields = field_selection(ListingOut)


@pytest.fixture
async def listing_client(app: Any, listings: Runtime) -> AsyncIterator[httpx2.AsyncClient]:
    router = APIRouter()

    @router.get("/test-pages/listings", response_model=Page[ListingOut])
    async def list_listings(
        session: SessionDep,
        page: PageRequestDep,
        fields: Annotated[FieldSelection, Depends(ListingFields)],
    ) -> Any:
        rows, next_cursor = await NEWEST.fetch(session, select(Listing), page)
        return page_response(
            [ListingOut.model_validate(r, from_attributes=True) for r in rows], next_cursor, fields
        )

    @router.get("/test-pages/other")
    async def list_other(session: SessionDep, page: PageRequestDep) -> Page[ListingOut]:
        keyset = Keyset("test.other", SortKey(Listing.price), id_column=Listing.id)
        rows, next_cursor = await keyset.fetch(session, select(Listing), page)
        items = [ListingOut.model_validate(r, from_attributes=True) for r in rows]
        return Page(items=items, next_cursor=next_cursor)

    app.include_router(router)
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_list_endpoint_pages_through_everything(
    listing_client: httpx2.AsyncClient, listings: Runtime
) -> None:
    made = await add_listings(listings, [(f"item {i:02d}", i, i) for i in range(45)])
    first = await listing_client.get("/test-pages/listings")
    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"items", "next_cursor"}
    assert len(body["items"]) == 20  # the default limit
    seen = [item["id"] for item in body["items"]]
    cursor = body["next_cursor"]
    while cursor:
        response = await listing_client.get(
            "/test-pages/listings", params={"cursor": cursor, "limit": 20}
        )
        assert response.status_code == 200
        seen += [item["id"] for item in response.json()["items"]]
        cursor = response.json()["next_cursor"]
    assert seen == [str(row.id) for row in reversed(made)]
    assert body["items"][0] == {
        "id": str(made[-1].id),
        "title": "item 44",
        "price": 44,
        "listed_at": "2030-01-01T00:44:00Z",
        "seller": "Mama Njeri",
    }


async def test_last_page_has_no_cursor(
    listing_client: httpx2.AsyncClient, listings: Runtime
) -> None:
    await add_listings(listings, [("a", 1, 1), ("b", 2, 2)])
    exact = await listing_client.get("/test-pages/listings", params={"limit": 2})
    assert len(exact.json()["items"]) == 2
    assert exact.json()["next_cursor"] is None
    empty = await listing_client.get("/test-pages/other")
    assert empty.status_code == 200
    assert len(empty.json()["items"]) == 2


@pytest.mark.parametrize("limit", ["0", "101", "-1", "twenty", "1.5"])
async def test_limit_out_of_range_is_422(listing_client: httpx2.AsyncClient, limit: str) -> None:
    response = await listing_client.get("/test-pages/listings", params={"limit": limit})
    assert response.status_code == 422
    problem = response.json()
    assert problem["type"] == "/problems/validation-error"
    assert [(e["in"], e["field"]) for e in problem["errors"]] == [("query", "limit")]


async def test_limit_bounds_are_accepted(
    listing_client: httpx2.AsyncClient, listings: Runtime
) -> None:
    await add_listings(listings, [(f"x{i}", 1, i) for i in range(3)])
    for limit, count in (("1", 1), ("100", 3)):
        response = await listing_client.get("/test-pages/listings", params={"limit": limit})
        assert response.status_code == 200
        assert len(response.json()["items"]) == count


async def test_tampered_and_foreign_cursors_answer_invalid_cursor(
    listing_client: httpx2.AsyncClient, listings: Runtime
) -> None:
    await add_listings(listings, [(f"x{i}", i, i) for i in range(5)])
    first = await listing_client.get("/test-pages/listings", params={"limit": 2})
    cursor = first.json()["next_cursor"]
    other = await listing_client.get("/test-pages/other", params={"limit": 2})
    foreign = other.json()["next_cursor"]
    assert cursor and foreign

    for bad in (_tamper_payload(cursor), foreign, "garbage", cursor[:-3] + "xyz"):
        response = await listing_client.get(
            "/test-pages/listings", params={"cursor": bad, "limit": 2}
        )
        assert response.status_code == 400, bad
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == "/problems/invalid-cursor"
        assert problem["request_id"] == response.headers["x-request-id"]

    too_long = await listing_client.get("/test-pages/listings", params={"cursor": "a" * 5000})
    assert too_long.status_code == 422


async def test_fields_selection_trims_items_and_keeps_the_id(
    listing_client: httpx2.AsyncClient, listings: Runtime
) -> None:
    await add_listings(listings, [("Sukuma wiki", 50, 1)])
    response = await listing_client.get("/test-pages/listings", params={"fields": "title, seller"})
    assert response.status_code == 200
    (item,) = response.json()["items"]
    assert set(item) == {"id", "title", "seller"}
    assert item["title"] == "Sukuma wiki"

    everything = await listing_client.get("/test-pages/listings", params={"fields": ""})
    assert set(everything.json()["items"][0]) == {"id", "title", "price", "listed_at", "seller"}


async def test_unknown_fields_answer_the_unknown_field_problem(
    listing_client: httpx2.AsyncClient,
) -> None:
    response = await listing_client.get(
        "/test-pages/listings", params={"fields": "title,password_hash,seller_name"}
    )
    assert response.status_code == 400
    problem = response.json()
    assert problem["type"] == "/problems/unknown-field"
    # the Python name of an aliased field is not a public name
    assert problem["unknown"] == ["password_hash", "seller_name"]
    assert "seller" in problem["allowed"]


async def test_list_schema_in_openapi(listing_client: httpx2.AsyncClient) -> None:
    document = (await listing_client.get("/api/v1/openapi.json")).json()
    operation = document["paths"]["/test-pages/listings"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["limit"]["schema"]["maximum"] == 100
    assert parameters["limit"]["schema"]["default"] == 20
    assert "fields" in parameters and "cursor" in parameters
    page_schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    name = page_schema["$ref"].rsplit("/", 1)[1]
    assert set(document["components"]["schemas"][name]["properties"]) == {"items", "next_cursor"}
