"""What other domains read of the catalog: variants for sale, in one query, with
``purchasable`` telling what a buyer may still add or check out."""

from __future__ import annotations

import uuid

import httpx2

from soko.catalog.public import CATALOG_TAG, VariantForSale, product_tag, variants_for_sale
from soko.platform.runtime import Runtime
from tests.catalog.support import SELLER_PRODUCTS, SELLER_VARIANTS, Catalog, count_statements, ok


async def test_variants_for_sale_in_one_query(
    client: httpx2.AsyncClient, catalog: Catalog, runtime: Runtime
) -> None:
    store = await catalog.store()
    published = await store.product(
        1500,
        900,
        title="Kiondo",
        images=["https://img.example.com/kiondo.jpg"],
        variants=[
            {
                "sku": "KIO-S",
                "options": {"size": "S", "colour": "red"},
                "price": {"amount": 1500, "currency": "KES"},
                "compare_at_price": {"amount": 2000, "currency": "KES"},
                "weight_grams": 400,
            },
            {"sku": "KIO-L", "options": {"size": "L"}, "price": {"amount": 900, "currency": "KES"}},
        ],
    )
    draft = await store.product(700, title="Draft", publish=False)
    small, large = (uuid.UUID(v["id"]) for v in published["variants"])
    hidden = uuid.UUID(draft["variants"][0]["id"])
    ok(await client.post(f"{SELLER_VARIANTS}/{large}/archive", headers=store.headers))
    unknown = uuid.uuid4()

    async with runtime.db.transaction(read_only=True) as session:
        with count_statements(runtime) as statements:
            found = await variants_for_sale(session, [small, large, hidden, unknown, small])
    assert statements.count == 1
    assert set(found) == {small, large, hidden}
    assert found[small] == VariantForSale(
        variant_id=small,
        product_id=uuid.UUID(published["id"]),
        seller_id=store.seller_id,
        title="Kiondo",
        sku="KIO-S",
        options={"size": "S", "colour": "red"},
        price_minor=1500,
        currency="KES",
        compare_at_minor=2000,
        image="https://img.example.com/kiondo.jpg",
        purchasable=True,
        weight_grams=400,
    )
    assert found[large].purchasable is False  # archived variant
    assert found[hidden].purchasable is False  # draft product
    assert found[hidden].image is None

    ok(await client.post(f"{SELLER_PRODUCTS}/{published['id']}/archive", headers=store.headers))
    async with runtime.db.transaction(read_only=True) as session:
        assert (await variants_for_sale(session, [small]))[small].purchasable is False
        assert await variants_for_sale(session, []) == {}


def test_cache_tags_are_distinct_per_product() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    assert product_tag(first) != product_tag(second)
    assert CATALOG_TAG not in (product_tag(first), product_tag(second))
