"""A store's own products and variants: the lifecycle, the rules of prices, currencies and
SKUs, who in a store may change what, and that another store's products are invisible."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx2
import pytest
from sqlalchemy import select

from soko.catalog import service as catalog_service
from soko.catalog.models import Product
from soko.inventory.models import InventoryItem
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from tests.catalog.support import (
    PRODUCTS,
    SELLER_PRODUCTS,
    SELLER_VARIANTS,
    Catalog,
    Store,
    money,
    ok,
    problem_type,
    variant_body,
)
from tests.identity.conftest import MakeUser


async def _product(store: Store, product_id: Any) -> httpx2.Response:
    return await store.client.get(f"{SELLER_PRODUCTS}/{product_id}", headers=store.headers)


async def test_a_product_goes_from_draft_to_published_to_archived_and_back(
    client: httpx2.AsyncClient, catalog: Catalog, runtime: Runtime
) -> None:
    store = await catalog.store()
    draft = await store.product(1500, 1200, title="Kiondo basket", publish=False)
    assert draft["status"] == "draft" and draft["published_at"] is None
    assert draft["seller_id"] == str(store.seller_id)
    assert draft["min_price"] == money(1200)
    assert [v["price"] for v in draft["variants"]] == [money(1500), money(1200)]
    # Buyers do not see drafts.
    assert (await client.get(f"{PRODUCTS}/{draft['id']}")).status_code == 404

    published = ok(
        await client.post(f"{SELLER_PRODUCTS}/{draft['id']}/publish", headers=store.headers)
    )
    assert published["status"] == "published" and published["published_at"]
    assert published["version"] > draft["version"]
    assert ok(await client.get(f"{PRODUCTS}/{draft['id']}"))["title"] == "Kiondo basket"

    again = await client.post(f"{SELLER_PRODUCTS}/{draft['id']}/publish", headers=store.headers)
    assert (again.status_code, problem_type(again)) == (409, "product-state-conflict")
    assert again.json()["current_status"] == "published"

    archived = ok(
        await client.post(f"{SELLER_PRODUCTS}/{draft['id']}/archive", headers=store.headers)
    )
    assert archived["status"] == "archived"
    assert (await client.get(f"{PRODUCTS}/{draft['id']}")).status_code == 404
    twice = await client.post(f"{SELLER_PRODUCTS}/{draft['id']}/archive", headers=store.headers)
    assert (twice.status_code, problem_type(twice)) == (409, "product-state-conflict")

    republished = ok(
        await client.post(f"{SELLER_PRODUCTS}/{draft['id']}/publish", headers=store.headers)
    )
    assert republished["status"] == "published"
    # Its first publication: it keeps its place in the "newest" order, so a client
    # paging through the listing meanwhile neither skips nor repeats it.
    assert republished["published_at"] == published["published_at"]

    async with runtime.db.transaction(read_only=True) as session:
        events = (
            await session.scalars(
                select(OutboxMessage.name).order_by(OutboxMessage.created_at, OutboxMessage.id)
            )
        ).all()
    assert [name for name in events if name.startswith("product.")] == [
        "product.published",
        "product.archived",
        "product.published",
    ]


async def test_publishing_needs_an_active_variant_and_an_active_store(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    bare = ok(
        await client.post(SELLER_PRODUCTS, json={"title": "Empty shelf"}, headers=store.headers),
        201,
    )
    assert bare["variants"] == [] and bare["min_price"] is None
    assert bare["currency"] == "KES"  # the marketplace's default
    refused = await client.post(f"{SELLER_PRODUCTS}/{bare['id']}/publish", headers=store.headers)
    assert (refused.status_code, problem_type(refused)) == (409, "product-needs-variant")

    pending = await catalog.store(approve=False)
    product = await pending.product(publish=False)
    refused = await client.post(
        f"{SELLER_PRODUCTS}/{product['id']}/publish", headers=pending.headers
    )
    assert (refused.status_code, problem_type(refused)) == (403, "seller-not-active")


async def test_the_last_active_variant_of_a_published_product_stays(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    product = await store.product(900, 700)
    first, second = (variant["id"] for variant in product["variants"])
    archived = ok(await client.post(f"{SELLER_VARIANTS}/{second}/archive", headers=store.headers))
    assert archived["status"] == "archived"
    view = ok(await _product(store, product["id"]))
    assert view["min_price"] == money(900)  # the archived cheaper one no longer counts
    refused = await client.post(f"{SELLER_VARIANTS}/{first}/archive", headers=store.headers)
    assert (refused.status_code, problem_type(refused)) == (409, "product-needs-variant")
    # Archiving twice changes nothing.
    assert (
        ok(await client.post(f"{SELLER_VARIANTS}/{second}/archive", headers=store.headers))[
            "version"
        ]
        == archived["version"]
    )


async def test_prices_follow_the_product_currency_and_compare_at_is_above_price(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    product = await store.product(1000, publish=False, currency="UGX")
    url = f"{SELLER_PRODUCTS}/{product['id']}/variants"
    wrong_currency = await client.post(
        url, json=variant_body(500, currency="KES"), headers=store.headers
    )
    assert (wrong_currency.status_code, problem_type(wrong_currency)) == (422, "validation-error")
    assert wrong_currency.json()["errors"][0]["field"] == "price"
    not_above = await client.post(
        url,
        json=variant_body(500, currency="UGX", compare_at_price=money(500, "UGX")),
        headers=store.headers,
    )
    assert (not_above.status_code, problem_type(not_above)) == (422, "validation-error")
    assert not_above.json()["errors"][0]["field"] == "compare_at_price"
    unknown = await client.post(url, json=variant_body(500, currency="XYZ"), headers=store.headers)
    assert unknown.status_code == 422
    float_price = await client.post(
        url,
        json={**variant_body(currency="UGX"), "price": {"amount": 5.5, "currency": "UGX"}},
        headers=store.headers,
    )
    assert float_price.status_code == 422

    variant = ok(
        await client.post(
            url,
            json=variant_body(
                800, currency="UGX", compare_at_price=money(1200, "UGX"), weight_grams=250
            ),
            headers=store.headers,
        ),
        201,
    )
    assert variant["compare_at_price"] == money(1200, "UGX")
    # Lowering compare-at under the price is refused; clearing it is fine.
    vurl = f"{SELLER_VARIANTS}/{variant['id']}"
    refused = await client.patch(
        vurl, json={"compare_at_price": money(700, "UGX")}, headers=store.headers
    )
    assert refused.status_code == 422
    refused = await client.patch(vurl, json={"price": money(1300, "UGX")}, headers=store.headers)
    assert refused.status_code == 422  # now above the compare-at price
    cleared = ok(
        await client.patch(
            vurl,
            json={"price": money(1300, "UGX"), "compare_at_price": None, "weight_grams": None},
            headers=store.headers,
        )
    )
    assert cleared["compare_at_price"] is None and cleared["weight_grams"] is None
    assert ok(await _product(store, product["id"]))["min_price"] == money(1000, "UGX")

    # The currency of a product with variants is fixed; of one without, it may change.
    locked = await client.patch(
        f"{SELLER_PRODUCTS}/{product['id']}", json={"currency": "KES"}, headers=store.headers
    )
    assert (locked.status_code, problem_type(locked)) == (422, "validation-error")
    bare = ok(await client.post(SELLER_PRODUCTS, json={"title": "Bare"}, headers=store.headers))
    moved = ok(
        await client.patch(
            f"{SELLER_PRODUCTS}/{bare['id']}", json={"currency": "TZS"}, headers=store.headers
        )
    )
    assert moved["currency"] == "TZS"


async def test_min_price_follows_every_variant_change(
    client: httpx2.AsyncClient, catalog: Catalog, runtime: Runtime
) -> None:
    store = await catalog.store()
    product = await store.product(3000, 2000)
    cheap = product["variants"][1]["id"]
    ok(
        await client.patch(
            f"{SELLER_VARIANTS}/{cheap}", json={"price": money(5000)}, headers=store.headers
        )
    )
    assert ok(await _product(store, product["id"]))["min_price"] == money(3000)
    added = ok(
        await client.post(
            f"{SELLER_PRODUCTS}/{product['id']}/variants",
            json=variant_body(100),
            headers=store.headers,
        ),
        201,
    )
    assert ok(await _product(store, product["id"]))["min_price"] == money(100)
    ok(await client.post(f"{SELLER_VARIANTS}/{added['id']}/archive", headers=store.headers))
    async with runtime.db.transaction(read_only=True) as session:
        stored = await session.get(Product, uuid.UUID(product["id"]))
        assert stored is not None and stored.min_price_minor == 3000


async def test_attributes_are_typed_and_images_are_urls(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    attributes = [
        {"key": "material", "type": "text", "value": "sisal"},
        {"key": "weight_kg", "type": "number", "value": 1.5},
        {"key": "handmade", "type": "boolean", "value": True},
    ]
    product = ok(
        await client.post(
            SELLER_PRODUCTS,
            json={
                "title": "Basket",
                "attributes": attributes,
                "images": ["https://img.example.com/basket.jpg"],
            },
            headers=store.headers,
        ),
        201,
    )
    assert product["attributes"] == attributes
    assert product["images"] == ["https://img.example.com/basket.jpg"]
    # Each mistake is one error, at the member that is wrong.
    for wrong, field in (
        ({"key": "handmade", "type": "boolean", "value": "yes"}, "value"),
        ({"key": "weight_kg", "type": "number", "value": "heavy"}, "value"),
        ({"key": "weight_kg", "type": "number", "value": True}, "value"),
        ({"key": "material", "type": "text", "value": 3}, "value"),
        ({"key": "material", "type": "text", "value": ["sisal"]}, "value"),
        ({"key": "material", "type": "text", "value": None}, "value"),
        ({"key": "material", "type": "text", "value": {"en": "sisal"}}, "value"),
        ({"key": "Bad Key", "type": "text", "value": "x"}, "key"),
        ({"key": "colour", "type": "date", "value": "x"}, "type"),
    ):
        refused = await client.post(
            SELLER_PRODUCTS, json={"title": "Basket", "attributes": [wrong]}, headers=store.headers
        )
        assert (refused.status_code, problem_type(refused)) == (422, "validation-error"), wrong
        errors = refused.json()["errors"]
        assert [error["field"] for error in errors] == [f"attributes.0.{field}"], (wrong, errors)
    twice = await client.post(
        SELLER_PRODUCTS,
        json={"title": "Basket", "attributes": [attributes[0], attributes[0]]},
        headers=store.headers,
    )
    assert twice.status_code == 422
    not_a_url = await client.post(
        SELLER_PRODUCTS,
        json={"title": "Basket", "images": ["ftp://img.example.com/x.jpg"]},
        headers=store.headers,
    )
    assert not_a_url.status_code == 422
    no_category = await client.post(
        SELLER_PRODUCTS,
        json={"title": "Basket", "category_id": str(uuid.uuid4())},
        headers=store.headers,
    )
    assert (no_category.status_code, problem_type(no_category)) == (422, "validation-error")


async def test_a_sku_is_unique_within_a_store_but_not_across_stores(
    client: httpx2.AsyncClient, catalog: Catalog, runtime: Runtime
) -> None:
    store, other = await catalog.store(), await catalog.store()
    product = await store.product(publish=False)
    url = f"{SELLER_PRODUCTS}/{product['id']}/variants"
    ok(await client.post(url, json=variant_body(sku="KB-RED-M"), headers=store.headers), 201)
    taken = await client.post(url, json=variant_body(sku="KB-RED-M"), headers=store.headers)
    assert (taken.status_code, problem_type(taken)) == (409, "sku-taken")
    # Within one request too.
    both = await client.post(
        SELLER_PRODUCTS,
        json={"title": "Twins", "variants": [variant_body(sku="T-1"), variant_body(sku="T-1")]},
        headers=store.headers,
    )
    assert both.status_code == 422
    # Another store may use it.
    theirs = await other.product(publish=False)
    ok(
        await client.post(
            f"{SELLER_PRODUCTS}/{theirs['id']}/variants",
            json=variant_body(sku="KB-RED-M"),
            headers=other.headers,
        ),
        201,
    )
    # Renaming onto a taken SKU is refused as well; inventory follows a rename.
    second = ok(await client.post(url, json=variant_body(sku="KB-BLUE-M"), headers=store.headers))
    renamed = await client.patch(
        f"{SELLER_VARIANTS}/{second['id']}", json={"sku": "KB-RED-M"}, headers=store.headers
    )
    assert (renamed.status_code, problem_type(renamed)) == (409, "sku-taken")
    ok(
        await client.patch(
            f"{SELLER_VARIANTS}/{second['id']}", json={"sku": "KB-NAVY-M"}, headers=store.headers
        )
    )
    async with runtime.db.transaction(read_only=True) as session:
        item = await session.get(InventoryItem, uuid.UUID(second["id"]))
        assert item is not None
        assert (item.sku, item.seller_id) == ("KB-NAVY-M", store.seller_id)

    # Once the product has been on sale, its SKUs name their variants for good (orders
    # carry them): a rename would free "KB-NAVY-M" for another variant.
    ok(await client.post(f"{SELLER_PRODUCTS}/{product['id']}/publish", headers=store.headers))
    fixed = await client.patch(
        f"{SELLER_VARIANTS}/{second['id']}", json={"sku": "KB-TEAL-M"}, headers=store.headers
    )
    assert (fixed.status_code, problem_type(fixed)) == (409, "sku-fixed")
    assert fixed.json()["sku"] == "KB-NAVY-M"
    ok(await client.post(f"{SELLER_PRODUCTS}/{product['id']}/archive", headers=store.headers))
    still = await client.patch(
        f"{SELLER_VARIANTS}/{second['id']}", json={"sku": "KB-TEAL-M"}, headers=store.headers
    )
    assert problem_type(still) == "sku-fixed"
    # The same SKU sent again is no change, and other fields still change.
    ok(
        await client.patch(
            f"{SELLER_VARIANTS}/{second['id']}",
            json={"sku": "KB-NAVY-M", "weight_grams": 400},
            headers=store.headers,
        )
    )


@pytest.mark.postgresql
async def test_two_requests_racing_for_one_sku_leave_one_variant(
    client: httpx2.AsyncClient, catalog: Catalog, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("a real race needs concurrent transactions: PostgreSQL")
    store = await catalog.store()
    products = [await store.product(publish=False) for _ in range(6)]
    answers = await asyncio.gather(
        *(
            client.post(
                f"{SELLER_PRODUCTS}/{product['id']}/variants",
                json=variant_body(sku="HOT-SKU"),
                headers=store.headers,
            )
            for product in products
        )
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [201] + [409] * 5, [answer.text for answer in answers]
    assert {problem_type(a) for a in answers if a.status_code == 409} == {"sku-taken"}


async def test_a_product_holds_a_bounded_number_of_variants(
    client: httpx2.AsyncClient, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_service, "MAX_VARIANTS_PER_PRODUCT", 3)
    store = await catalog.store()
    product = await store.product(1000, 1100, publish=False)
    url = f"{SELLER_PRODUCTS}/{product['id']}/variants"
    added = await client.post(url, json=variant_body(sku="THIRD"), headers=store.headers)
    assert added.status_code == 201, added.text
    archived = await client.post(
        f"{SELLER_VARIANTS}/{added.json()['id']}/archive", headers=store.headers
    )
    assert archived.status_code == 200, archived.text
    # Archived variants still count: they are never deleted.
    refused = await client.post(url, json=variant_body(sku="FOURTH"), headers=store.headers)
    assert (refused.status_code, problem_type(refused)) == (409, "too-many-variants")
    assert refused.json()["max_variants"] == 3
    assert len(ok(await _product(store, product["id"]))["variants"]) == 3


async def test_another_stores_products_and_variants_answer_404(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    mine, theirs = await catalog.store(), await catalog.store()
    product = await theirs.product()
    variant_id = product["variants"][0]["id"]
    calls = [
        ("GET", f"{SELLER_PRODUCTS}/{product['id']}", None),
        ("PATCH", f"{SELLER_PRODUCTS}/{product['id']}", {"title": "Mine now"}),
        ("POST", f"{SELLER_PRODUCTS}/{product['id']}/publish", None),
        ("POST", f"{SELLER_PRODUCTS}/{product['id']}/archive", None),
        ("POST", f"{SELLER_PRODUCTS}/{product['id']}/variants", variant_body()),
        ("GET", f"{SELLER_VARIANTS}/{variant_id}", None),
        ("PATCH", f"{SELLER_VARIANTS}/{variant_id}", {"price": money(1)}),
        ("POST", f"{SELLER_VARIANTS}/{variant_id}/archive", None),
    ]
    for method, url, body in calls:
        answer = await client.request(method, url, json=body, headers=mine.headers)
        assert (answer.status_code, problem_type(answer)) == (404, "not-found"), (method, url)
    listed = ok(await client.get(SELLER_PRODUCTS, headers=mine.headers))
    assert listed["items"] == []
    # Untouched.
    assert ok(await _product(theirs, product["id"]))["version"] == product["version"]


async def test_staff_read_and_managers_write(
    client: httpx2.AsyncClient, catalog: Catalog, make_user: MakeUser
) -> None:
    store = await catalog.store()
    staff = await store.add_member("staff", make_user)
    manager = await store.add_member("manager", make_user)
    product = await store.product(publish=False)
    as_staff, as_manager = store.as_member(staff), store.as_member(manager)

    assert ok(await client.get(f"{SELLER_PRODUCTS}/{product['id']}", headers=as_staff))
    assert ok(await client.get(SELLER_PRODUCTS, headers=as_staff))["items"]
    refusals = [
        await client.post(SELLER_PRODUCTS, json={"title": "No"}, headers=as_staff),
        await client.patch(
            f"{SELLER_PRODUCTS}/{product['id']}", json={"title": "No"}, headers=as_staff
        ),
        await client.post(f"{SELLER_PRODUCTS}/{product['id']}/publish", headers=as_staff),
        await client.post(
            f"{SELLER_PRODUCTS}/{product['id']}/variants", json=variant_body(), headers=as_staff
        ),
        await client.patch(
            f"{SELLER_VARIANTS}/{product['variants'][0]['id']}",
            json={"price": money(1)},
            headers=as_staff,
        ),
    ]
    for refused in refusals:
        assert (refused.status_code, problem_type(refused)) == (403, "seller-role-required")

    ok(
        await client.patch(
            f"{SELLER_PRODUCTS}/{product['id']}",
            json={"title": "By the manager"},
            headers=as_manager,
        )
    )
    ok(await client.post(f"{SELLER_PRODUCTS}/{product['id']}/publish", headers=as_manager))
    # Someone who is no member at all is told so.
    stranger = await make_user()
    outside = await client.get(SELLER_PRODUCTS, headers=store.as_member(stranger))
    assert (outside.status_code, problem_type(outside)) == (403, "not-a-seller")


async def test_if_match_guards_product_and_variant_changes(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    product = await store.product(publish=False)
    url = f"{SELLER_PRODUCTS}/{product['id']}"
    read = await client.get(url, headers=store.headers)
    etag = read.headers["etag"]
    assert etag == f'"v{product["version"]}"'
    unchanged = await client.get(url, headers={**store.headers, "If-None-Match": etag})
    assert unchanged.status_code == 304

    changed = await client.patch(
        url, json={"title": "First edit"}, headers={**store.headers, "If-Match": etag}
    )
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    stale = await client.patch(
        url, json={"title": "Second edit"}, headers={**store.headers, "If-Match": etag}
    )
    assert (stale.status_code, problem_type(stale)) == (412, "precondition-failed")
    assert stale.json()["current_etag"] == changed.headers["etag"]
    assert ok(await client.get(url, headers=store.headers))["title"] == "First edit"

    # A variant change moves the product's version too.
    variant = product["variants"][0]
    vurl = f"{SELLER_VARIANTS}/{variant['id']}"
    vetag = (await client.get(vurl, headers=store.headers)).headers["etag"]
    ok(
        await client.patch(
            vurl, json={"options": {"size": "L"}}, headers={**store.headers, "If-Match": vetag}
        )
    )
    stale_variant = await client.patch(
        vurl, json={"options": {"size": "XL"}}, headers={**store.headers, "If-Match": vetag}
    )
    assert stale_variant.status_code == 412
    product_etag = changed.headers["etag"]
    after = await client.patch(
        url, json={"title": "Third"}, headers={**store.headers, "If-Match": product_etag}
    )
    assert after.status_code == 412


async def test_the_store_lists_its_products_in_any_state_newest_first(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    made = [await store.product(publish=index % 2 == 0) for index in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = ok(await client.get(SELLER_PRODUCTS, params=params, headers=store.headers))
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [product["id"] for product in reversed(made)]
    drafts = ok(
        await client.get(SELLER_PRODUCTS, params={"status": "draft"}, headers=store.headers)
    )
    assert [item["id"] for item in drafts["items"]] == [made[3]["id"], made[1]["id"]]
    trimmed = ok(
        await client.get(SELLER_PRODUCTS, params={"fields": "title"}, headers=store.headers)
    )
    assert set(trimmed["items"][0]) == {"id", "title"}
