"""The public listing's ``seller=`` filter takes a store's id or its slug (what a
storefront's URL holds): the same products either way, nothing for a slug no active
store has, 422 for a value that can be neither, and no statement of its own."""

from __future__ import annotations

import uuid

import httpx2

from soko.catalog.public import CATALOG_TAG
from soko.platform.runtime import Runtime
from tests.catalog.support import API, PRODUCTS, Catalog, Store, count_statements, problem_type


async def _stores_with_products(catalog: Catalog) -> tuple[Store, Store, set[str]]:
    store, other = await catalog.store(), await catalog.store()
    mine = {(await store.product(1000 + step, title=f"Kiondo {step}"))["id"] for step in range(3)}
    await other.product(900, title="Kiondo elsewhere")
    return store, other, mine


async def test_a_store_is_named_by_its_id_or_its_slug(catalog: Catalog) -> None:
    store, other, mine = await _stores_with_products(catalog)

    by_id = await catalog.listed_ids(seller=str(store.seller_id))
    assert set(by_id) == mine
    assert await catalog.listed_ids(seller=store.slug) == by_id
    # Addressed as storefronts are: trimmed, any case.
    assert await catalog.listed_ids(seller=f"  {store.slug.upper()} ") == by_id
    # With the other filters, and for the other store.
    cheapest_first = await catalog.listed_ids(seller=store.slug, min_price=1001, sort="price")
    assert len(cheapest_first) == 2
    assert cheapest_first == await catalog.listed_ids(
        seller=str(store.seller_id), min_price=1001, sort="price"
    )
    assert set(await catalog.listed_ids(seller=other.slug)) == set(
        await catalog.listed_ids(seller=str(other.seller_id))
    )
    assert not set(await catalog.listed_ids(seller=other.slug)) & mine


async def test_pages_by_slug_follow_each_other(catalog: Catalog) -> None:
    store, _, mine = await _stores_with_products(catalog)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"seller": store.slug, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = await catalog.listing(**params)
        seen += [item["id"] for item in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert len(seen) == len(set(seen)) == 3
    assert set(seen) == mine


async def test_a_slug_no_active_store_has_lists_nothing(catalog: Catalog) -> None:
    store, _, mine = await _stores_with_products(catalog)
    pending = await catalog.store(approve=False)

    assert (await catalog.listing(seller="no-such-store"))["items"] == []
    assert await catalog.listed_ids(seller=pending.slug) == []

    # A suspended store's address lists nothing (the cached page is dropped), and its
    # products come back with it.
    assert set(await catalog.listed_ids(seller=store.slug)) == mine
    await catalog.decide(store.seller_id, "suspend")
    assert await catalog.listed_ids(seller=store.slug) == []
    await catalog.decide(store.seller_id, "reinstate")
    assert set(await catalog.listed_ids(seller=store.slug)) == mine


async def test_a_value_that_reads_as_an_id_is_an_id(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    """A store cannot take over another's listing by choosing that store's id as its
    slug: what reads as a UUID is always an id, in any of the forms a UUID is written."""
    store, _, mine = await _stores_with_products(catalog)
    owner = await catalog.make_user()
    applied = await client.post(
        f"{API}/sellers",
        json={"slug": str(store.seller_id), "store_name": "Impostor"},
        headers=owner.headers,
    )
    if applied.status_code == 201:  # the sellers domain lets such a slug through
        impostor = Store(client, owner, uuid.UUID(applied.json()["id"]), str(store.seller_id))
        await catalog.decide(impostor.seller_id, "approve")
        theirs = (await impostor.product(500, title="Not the real one"))["id"]
        assert await catalog.listed_ids(seller=str(impostor.seller_id)) == [theirs]
    else:
        assert applied.status_code == 422, applied.text

    for written in (str(store.seller_id), str(store.seller_id).upper(), store.seller_id.hex):
        assert set(await catalog.listed_ids(seller=written)) == mine, written


async def test_values_that_are_neither_an_id_nor_a_slug_are_refused(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    for value in ("x", "ab", "-duka", "duka-", "duka_1", "duka 1", "duka/1", "d" * 61, "d" * 81):
        answer = await client.get(PRODUCTS, params={"seller": value})
        assert (answer.status_code, problem_type(answer)) == (422, "validation-error"), value
        if len(value) <= 80:  # longer ones are refused by the parameter's schema
            [error] = answer.json()["errors"]
            assert (error["in"], error["field"]) == ("query", "seller"), answer.text
    # Blank is no filter at all, like the other text filters.
    everything = await catalog.listed_ids()
    assert await catalog.listed_ids(seller="  ") == everything


async def test_the_slug_costs_no_statement_of_its_own(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store, _, mine = await _stores_with_products(catalog)
    for params in (
        {"seller": store.slug},
        {"seller": store.slug, "in_stock": "false", "q": "kiondo", "sort": "-price"},
    ):
        await runtime.cache.invalidate_tags(CATALOG_TAG)  # a cold cache for this page
        with count_statements(runtime) as statements:
            answer = await client.get(PRODUCTS, params=params)
        assert answer.status_code == 200, answer.text
        assert {item["id"] for item in answer.json()["items"]} == mine
        assert statements.count <= 3, (params, statements.sent)
        # The seller's table is read inside the page's own statement.
        assert any("sellers" in sent and "products" in sent for sent in statements.sent)

        with count_statements(runtime) as statements:
            again = await client.get(PRODUCTS, params=params)
        assert again.content == answer.content
        assert statements.count == 0, (params, statements.sent)
