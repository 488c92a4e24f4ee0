"""The public listing and product pages: what buyers see, each filter and order, keyset
pages that hold still while products are added, ``fields=``, and conditional reads."""

from __future__ import annotations

import uuid
from typing import Any

import httpx2

from soko.platform.clock import ManualClock
from tests.catalog.support import (
    PRODUCTS,
    SELLER_PRODUCTS,
    SELLER_VARIANTS,
    Catalog,
    money,
    ok,
    problem_type,
)


async def _all_pages(catalog: Catalog, **params: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = await catalog.listing(**params, **({"cursor": cursor} if cursor else {}))
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def test_only_published_products_of_active_stores_are_listed(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    shown = await store.product(1200, 900, title="Sisal basket", description="Woven in Machakos")
    await store.product(title="Draft", publish=False)
    archived = await store.product(title="Gone")
    ok(await client.post(f"{SELLER_PRODUCTS}/{archived['id']}/archive", headers=store.headers))
    pending = await catalog.store(approve=False)
    await pending.product(title="Not yet", publish=False)

    page = await catalog.listing()
    assert [item["id"] for item in page["items"]] == [shown["id"]]
    assert page["next_cursor"] is None
    item = page["items"][0]
    assert item["title"] == "Sisal basket" and item["description"] == "Woven in Machakos"
    assert item["seller_id"] == str(store.seller_id)
    assert item["min_price"] == money(900) and item["currency"] == "KES"
    assert item["published_at"].endswith("Z")
    assert [v["price"] for v in item["variants"]] == [money(1200), money(900)]
    assert [v["available"] for v in item["variants"]] == [0, 0]
    assert item["in_stock"] is False
    assert (await client.get(f"{PRODUCTS}/{archived['id']}")).status_code == 404


async def test_a_suspended_stores_products_disappear_and_come_back(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store, other = await catalog.store(), await catalog.store()
    product = await store.product(title="Kanga")
    kept = await other.product(title="Kikoi")
    assert set(await catalog.listed_ids()) == {product["id"], kept["id"]}
    assert (await client.get(f"{PRODUCTS}/{product['id']}")).status_code == 200

    await catalog.decide(store.seller_id, "suspend")
    assert await catalog.listed_ids() == [kept["id"]]
    hidden = await client.get(f"{PRODUCTS}/{product['id']}")
    assert (hidden.status_code, problem_type(hidden)) == (404, "not-found")
    assert await catalog.listed_ids(seller=str(store.seller_id)) == []
    # While suspended it cannot publish either.
    draft = await store.product(publish=False)
    refused = await client.post(f"{SELLER_PRODUCTS}/{draft['id']}/publish", headers=store.headers)
    assert (refused.status_code, problem_type(refused)) == (403, "seller-not-active")

    await catalog.decide(store.seller_id, "reinstate")
    assert set(await catalog.listed_ids()) == {product["id"], kept["id"]}
    assert (await client.get(f"{PRODUCTS}/{product['id']}")).status_code == 200


async def test_the_category_filter_includes_descendants(catalog: Catalog) -> None:
    fashion = await catalog.category("Fashion")
    dresses = await catalog.category("Dresses", parent=fashion)
    kitenge = await catalog.category("Kitenge", parent=dresses)
    home = await catalog.category("Home")
    store = await catalog.store()
    top = await store.product(category_id=fashion["id"])
    middle = await store.product(category_id=dresses["id"])
    leaf = await store.product(category_id=kitenge["id"])
    elsewhere = await store.product(category_id=home["id"])
    await store.product()  # no category

    by_slug = await catalog.listed_ids(category=fashion["slug"])
    assert set(by_slug) == {top["id"], middle["id"], leaf["id"]}
    assert set(await catalog.listed_ids(category=dresses["id"])) == {middle["id"], leaf["id"]}
    assert await catalog.listed_ids(category=kitenge["slug"]) == [leaf["id"]]
    assert await catalog.listed_ids(category=home["id"]) == [elsewhere["id"]]
    assert await catalog.listed_ids(category="no-such-category") == []
    assert await catalog.listed_ids(category=str(uuid.uuid4())) == []

    # Moving a subtree moves its products in the filter at once.
    admin = (await catalog.admin()).headers
    ok(
        await catalog.client.patch(
            f"/api/v1/admin/categories/{dresses['id']}",
            json={"parent_id": home["id"]},
            headers=admin,
        )
    )
    assert await catalog.listed_ids(category=fashion["slug"]) == [top["id"]]
    assert set(await catalog.listed_ids(category=home["slug"])) == {
        elsewhere["id"],
        middle["id"],
        leaf["id"],
    }


async def test_seller_price_currency_and_text_filters(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store, other = await catalog.store(), await catalog.store()
    cheap = await store.product(500, 3000, title="Enamel mug", description="Tin, blue rim")
    middle = await store.product(1500, title="Kiondo BASKET", description="Sisal and leather")
    dear = await other.product(9000, title="Carved stool", description="Mvule wood; 50% off")
    shillings = await other.product(700, title="Ugandan basket", currency="UGX")

    assert set(await catalog.listed_ids(seller=str(store.seller_id))) == {cheap["id"], middle["id"]}
    assert set(await catalog.listed_ids(min_price=1000)) == {middle["id"], dear["id"]}
    # The price is the lowest variant's: 500 for the mug, whatever its 3000 variant.
    assert set(await catalog.listed_ids(max_price=1000)) == {cheap["id"], shillings["id"]}
    assert await catalog.listed_ids(min_price=1000, max_price=2000) == [middle["id"]]
    assert await catalog.listed_ids(currency="UGX") == [shillings["id"]]
    assert set(await catalog.listed_ids(q="basket")) == {middle["id"], shillings["id"]}
    assert await catalog.listed_ids(q="LEATHER") == [middle["id"]]
    assert await catalog.listed_ids(q="blue rim") == [cheap["id"]]
    # Wildcards are plain characters.
    assert await catalog.listed_ids(q="50%") == [dear["id"]]
    assert await catalog.listed_ids(q="%") == [dear["id"]]
    assert await catalog.listed_ids(q="_") == []
    assert await catalog.listed_ids(q="basket", seller=str(other.seller_id)) == [shillings["id"]]

    wrong = await client.get(PRODUCTS, params={"min_price": 2000, "max_price": 1000})
    assert (wrong.status_code, problem_type(wrong)) == (422, "validation-error")
    for params in ({"min_price": -1}, {"currency": "kes"}, {"seller": "x"}, {"sort": "best"}):
        assert (await client.get(PRODUCTS, params=params)).status_code == 422, params


async def test_every_wrong_parameter_of_a_listing_is_named_in_one_answer(
    client: httpx2.AsyncClient,
) -> None:
    wrong = await client.get(
        PRODUCTS, params={"limit": 0, "min_price": -1, "sort": "best", "in_stock": "maybe"}
    )
    assert (wrong.status_code, problem_type(wrong)) == (422, "validation-error")
    assert [(error["in"], error["field"]) for error in wrong.json()["errors"]] == [
        ("query", "min_price"),
        ("query", "in_stock"),
        ("query", "sort"),
        ("query", "limit"),
    ]
    document = (await client.get("/api/v1/openapi.json")).json()
    operation = document["paths"][PRODUCTS]["get"]
    assert [parameter["name"] for parameter in operation["parameters"]] == [
        "category", "seller", "min_price", "max_price", "currency", "in_stock", "q", "sort",
        "limit", "cursor", "fields",
    ]  # fmt: skip


async def test_the_in_stock_filter_and_availability(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    stocked = await store.product(1000, 1200)
    empty = await store.product(800)
    gone = await store.product(700)
    small, large = (variant["id"] for variant in stocked["variants"])
    await store.set_stock(large, 5)
    await store.set_stock(gone["variants"][0]["id"], 0)

    assert await catalog.listed_ids(in_stock="true") == [stocked["id"]]
    assert set(await catalog.listed_ids(in_stock="false")) == {
        stocked["id"],
        empty["id"],
        gone["id"],
    }
    item = next(i for i in (await catalog.listing())["items"] if i["id"] == stocked["id"])
    assert item["in_stock"] is True
    assert [(v["id"], v["available"], v["in_stock"]) for v in item["variants"]] == [
        (small, 0, False),
        (large, 5, True),
    ]
    detail = ok(await client.get(f"{PRODUCTS}/{stocked['id']}"))
    assert [v["available"] for v in detail["variants"]] == [0, 5]

    # An archived variant's stock no longer makes its product "in stock".
    await store.set_stock(small, 2)
    ok(await client.post(f"{SELLER_VARIANTS}/{large}/archive", headers=store.headers))
    detail = ok(await client.get(f"{PRODUCTS}/{stocked['id']}"))
    assert [v["id"] for v in detail["variants"]] == [small]
    await store.set_stock(small, 0)
    assert await catalog.listed_ids(in_stock="true") == []


async def test_sorting_by_newest_price_and_title(catalog: Catalog, clock: ManualClock) -> None:
    store = await catalog.store()
    made = {}
    for title, price in (("bamba", 300), ("adidi", 100), ("chapati", 300), ("dawa", 200)):
        made[title] = (await store.product(price, title=title))["id"]
        clock.advance(60)

    newest = [made[t] for t in ("dawa", "chapati", "adidi", "bamba")]
    assert await catalog.listed_ids() == newest
    assert await catalog.listed_ids(sort="newest") == newest
    assert await catalog.listed_ids(sort="title") == [
        made[t] for t in ("adidi", "bamba", "chapati", "dawa")
    ]
    # Equal prices are ordered by id, in the direction of the sort.
    tied = sorted([made["bamba"], made["chapati"]])
    assert await catalog.listed_ids(sort="price") == [made["adidi"], made["dawa"], *tied]
    assert await catalog.listed_ids(sort="-price") == [*reversed(tied), made["dawa"], made["adidi"]]
    # Paging gives the same order, a page at a time, for every sort.
    for sort in ("newest", "price", "-price", "title"):
        assert await _all_pages(catalog, sort=sort, limit=1) == await catalog.listed_ids(sort=sort)


async def test_pages_hold_still_while_products_are_added(
    catalog: Catalog, clock: ManualClock
) -> None:
    store = await catalog.store()
    first_batch = []
    for index in range(6):
        first_batch.append((await store.product(1000 + index, title=f"item {index:02}"))["id"])
        clock.advance(1)
    for sort in ("newest", "price", "-price", "title"):
        page = await catalog.listing(sort=sort, limit=3)
        seen = [item["id"] for item in page["items"]]
        # Products inserted between pages, some sorting before the cursor, some after.
        for extra in (999, 1002, 2000):
            await store.product(extra, title=f"item {extra}")
            clock.advance(1)
        cursor = page["next_cursor"]
        while cursor:
            page = await catalog.listing(sort=sort, limit=3, cursor=cursor)
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
        assert len(seen) == len(set(seen)), f"{sort}: a product came twice"
        assert set(first_batch) <= set(seen), f"{sort}: a product was skipped"


async def test_a_product_archived_and_published_again_between_pages_is_seen_once(
    client: httpx2.AsyncClient, catalog: Catalog, clock: ManualClock
) -> None:
    store = await catalog.store()
    ids = []
    for index in range(6):
        ids.append((await store.product(1000 + index, title=f"item {index:02}"))["id"])
        clock.advance(1)
    page = await catalog.listing(sort="newest", limit=3)
    seen = [item["id"] for item in page["items"]]
    unseen = ids[0]  # the oldest: on the last page
    for action in ("archive", "publish"):
        ok(await client.post(f"{SELLER_PRODUCTS}/{unseen}/{action}", headers=store.headers))
    clock.advance(1)
    cursor = page["next_cursor"]
    while cursor:
        page = await catalog.listing(sort="newest", limit=3, cursor=cursor)
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
    assert sorted(seen) == sorted(ids)


async def test_cursors_are_bound_to_their_order(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    for _ in range(3):
        await store.product()
    cursor = (await catalog.listing(limit=1))["next_cursor"]
    wrong = await client.get(PRODUCTS, params={"cursor": cursor, "sort": "price"})
    assert (wrong.status_code, problem_type(wrong)) == (400, "invalid-cursor")
    # A character in the middle: base64's last character may carry bits a decoder
    # ignores, so a change there could decode to the very same cursor.
    middle = len(cursor) // 2
    tampered = cursor[:middle] + ("A" if cursor[middle] != "A" else "B") + cursor[middle + 1 :]
    forged = await client.get(PRODUCTS, params={"cursor": tampered})
    assert (forged.status_code, problem_type(forged)) == (400, "invalid-cursor")


async def test_fields_selects_what_each_item_carries(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    await store.product(title="Kikapu")
    page = await catalog.listing(fields="title,min_price")
    assert page["items"] == [
        {"id": page["items"][0]["id"], "title": "Kikapu", "min_price": money(1000)}
    ]
    full = (await catalog.listing())["items"][0]
    assert {"variants", "images", "attributes", "in_stock"} <= set(full)
    unknown = await client.get(PRODUCTS, params={"fields": "title,secret"})
    assert (unknown.status_code, problem_type(unknown)) == (400, "unknown-field")
    assert "title" in unknown.json()["allowed"]


async def test_a_product_page_shows_store_category_and_variants(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    category = await catalog.category("Kitchen")
    store = await catalog.store()
    product = await store.product(
        2500,
        title="Jiko",
        category_id=category["id"],
        images=["https://img.example.com/jiko.jpg", "https://img.example.com/jiko-2.jpg"],
        attributes=[{"key": "fuel", "type": "text", "value": "charcoal"}],
    )
    detail = ok(await client.get(f"{PRODUCTS}/{product['id']}"))
    assert detail["seller"] == {
        "id": str(store.seller_id),
        "slug": store.slug,
        "store_name": detail["seller"]["store_name"],
    }
    assert detail["category"] == {
        "id": category["id"],
        "slug": category["slug"],
        "name": "Kitchen",
    }
    assert detail["images"][0] == "https://img.example.com/jiko.jpg"
    assert detail["attributes"] == [{"key": "fuel", "type": "text", "value": "charcoal"}]
    assert detail["variants"][0]["sku"] == product["variants"][0]["sku"]
    assert detail["variants"][0]["options"] == {"size": "M"}
    missing = await client.get(f"{PRODUCTS}/{uuid.uuid4()}")
    assert (missing.status_code, problem_type(missing)) == (404, "not-found")
    assert (await client.get(f"{PRODUCTS}/not-an-id")).status_code == 422


async def test_list_and_page_answer_304_until_they_change(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    product = await store.product(title="Mkeka")
    for url in (PRODUCTS, f"{PRODUCTS}/{product['id']}"):
        first = await client.get(url)
        etag = first.headers["etag"]
        assert first.headers["cache-control"] == "private, no-cache"
        same = await client.get(url, headers={"If-None-Match": etag})
        assert same.status_code == 304 and same.content == b""
        assert same.headers["etag"] == etag
    list_etag = (await client.get(PRODUCTS)).headers["etag"]
    page_etag = (await client.get(f"{PRODUCTS}/{product['id']}")).headers["etag"]
    ok(
        await client.patch(
            f"{SELLER_PRODUCTS}/{product['id']}",
            json={"title": "Mkeka mpya"},
            headers=store.headers,
        )
    )
    relisted = await client.get(PRODUCTS, headers={"If-None-Match": list_etag})
    assert relisted.status_code == 200 and relisted.json()["items"][0]["title"] == "Mkeka mpya"
    reread = await client.get(f"{PRODUCTS}/{product['id']}", headers={"If-None-Match": page_etag})
    assert reread.status_code == 200 and reread.json()["title"] == "Mkeka mpya"


async def test_json_values_are_served_as_stored(
    client: httpx2.AsyncClient, catalog: Catalog, backend: str
) -> None:
    store = await catalog.store()
    attributes = [
        {"key": "pattern", "type": "text", "value": 'Kitenge "Ua" \u2713 </b>'},
        {"key": "weight_kg", "type": "number", "value": 1.25},
    ]
    images = ["https://img.example.com/kitenge.jpg"]
    product = await store.product(1500, title="Kitenge", attributes=attributes, images=images)
    listed = await client.get(PRODUCTS)
    shown = await client.get(f"{PRODUCTS}/{product['id']}")
    for answer, item in ((listed, ok(listed)["items"][0]), (shown, ok(shown))):
        assert (item["attributes"], item["images"]) == (attributes, images)
        assert item["variants"][0]["options"] == {"size": "M"}
        if backend == "postgresql":
            # The stored text itself (written with ", " and ": "), not parsed and written
            # again (which would be compact).
            assert b'{"size": "M"}' in answer.content
            assert b'"key": "weight_kg", "type": "number", "value": 1.25' in answer.content
