"""Applying for a store, storefronts and the stores a user belongs to."""

from __future__ import annotations

import asyncio
import uuid

import httpx2
from sqlalchemy import text, update

from soko.platform.runtime import Runtime
from soko.sellers.models import Seller
from tests.identity.conftest import MakeUser
from tests.sellers.conftest import (
    MY_STORES,
    PROFILE,
    SELLERS,
    OutboxReader,
    Stores,
    as_store,
    join_store,
    problem_type,
)


async def test_a_signed_in_user_applies_and_owns_a_pending_store(
    client: httpx2.AsyncClient, make_user: MakeUser, published: OutboxReader
) -> None:
    owner = await make_user()
    response = await client.post(
        SELLERS,
        json={
            "slug": "  Mama-Mboga  ",
            "store_name": " Mama Mboga ",
            "description": "Fresh greens from Kiambu",
            "contact_email": "orders@MamaMboga.co.ke",
            "contact_phone": "+254 712 345 678",
        },
        headers=owner.headers,
    )
    assert response.status_code == 201, response.text
    store = response.json()
    assert store["slug"] == "mama-mboga"
    assert store["store_name"] == "Mama Mboga"
    assert store["status"] == "pending"
    assert store["contact_email"] == "orders@mamamboga.co.ke"
    assert store["contact_phone"] == "+254712345678"
    assert store["has_payout_details"] is False
    assert response.headers["etag"] == '"v1"'

    mine = (await client.get(MY_STORES, headers=owner.headers)).json()
    assert mine["items"] == [
        {
            "id": store["id"],
            "slug": "mama-mboga",
            "store_name": "Mama Mboga",
            "status": "pending",
            "role": "owner",
            "added_at": mine["items"][0]["added_at"],
        }
    ]
    assert await published("seller.applied") == [
        {"seller_id": store["id"], "actor_id": str(owner.user_id), "reason": ""}
    ]


async def test_applying_needs_a_signed_in_user(client: httpx2.AsyncClient) -> None:
    response = await client.post(SELLERS, json={"slug": "anon-shop", "store_name": "Anon"})
    assert response.status_code == 401


async def test_slugs_are_validated(client: httpx2.AsyncClient, make_user: MakeUser) -> None:
    owner = await make_user()
    for slug in ("ab", "-leading", "trailing-", "under_score", "nafasi tupu", "a" * 61, "duka!"):
        response = await client.post(
            SELLERS, json={"slug": slug, "store_name": "Duka"}, headers=owner.headers
        )
        assert response.status_code == 422, slug
        assert response.json()["errors"][0]["field"] == "slug"
    for body in (
        {"slug": "duka-one", "store_name": ""},
        {"slug": "duka-one", "store_name": "Duka", "contact_email": "not-an-email"},
        {"slug": "duka-one", "store_name": "Duka", "contact_phone": "0712"},
        {"slug": "duka-one", "store_name": "Duka", "unknown": 1},
    ):
        response = await client.post(SELLERS, json=body, headers=owner.headers)
        assert response.status_code == 422, body


async def test_a_taken_slug_is_refused_and_a_user_may_own_several_stores(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, other = await make_user(), await make_user()
    first = await stores.apply(owner, slug="kikapu")
    response = await client.post(
        SELLERS, json={"slug": "KIKAPU", "store_name": "Another"}, headers=other.headers
    )
    assert response.status_code == 409
    assert problem_type(response) == "seller-slug-taken"
    second = await stores.apply(owner, slug="kikapu-two")
    mine = (await client.get(MY_STORES, headers=owner.headers)).json()["items"]
    assert {item["id"] for item in mine} == {first["id"], second["id"]}
    assert (await client.get(MY_STORES, headers=other.headers)).json()["items"] == []


async def test_a_user_has_at_most_three_applications_waiting_even_sent_at_once(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores, runtime: Runtime
) -> None:
    owner = await make_user()
    answers = await asyncio.gather(
        *(
            client.post(
                SELLERS,
                json={"slug": f"duka-{n}-{uuid.uuid4().hex[:6]}", "store_name": f"Duka {n}"},
                headers=owner.headers,
            )
            for n in range(6)
        )
    )
    assert sorted(answer.status_code for answer in answers) == [201] * 3 + [409] * 3
    refused = [answer for answer in answers if answer.status_code == 409]
    assert {problem_type(answer) for answer in refused} == {"seller-applications-pending"}
    assert refused[0].json()["max_pending"] == 3
    # A decision frees a place: an approved store no longer waits.
    waiting = [answer.json()["id"] for answer in answers if answer.status_code == 201]
    assert (await stores.decide(waiting[0], "approve")).status_code == 200
    assert (await stores.apply(owner))["status"] == "pending"
    async with runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(text("SELECT count(*) FROM sellers")) == 4


async def test_two_applications_racing_for_one_slug_give_one_store(
    client: httpx2.AsyncClient, make_user: MakeUser, runtime: Runtime
) -> None:
    """The unique index decides: on PostgreSQL both inserts run at once and the second
    waits for the first to commit; on SQLite the writers take turns."""
    applicants = [await make_user() for _ in range(6)]
    responses = await asyncio.gather(
        *(
            client.post(
                SELLERS,
                json={"slug": "soko-la-jioni", "store_name": f"Applicant {i}"},
                headers=user.headers,
            )
            for i, user in enumerate(applicants)
        )
    )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201, 409, 409, 409, 409, 409]
    assert all(
        problem_type(response) == "seller-slug-taken"
        for response in responses
        if response.status_code == 409
    )
    async with runtime.db.transaction(read_only=True) as session:
        count = await session.scalar(text("SELECT count(*) FROM sellers"))
        members = await session.scalar(text("SELECT count(*) FROM seller_members"))
    assert count == 1
    assert members == 1


async def test_payout_details_are_encrypted_at_rest_and_shown_to_owners_only(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores, runtime: Runtime
) -> None:
    owner, manager = await make_user(), await make_user()
    till = "MPESA-TILL-5550123"
    store = await stores.apply(owner, payout_details={"method": "mpesa", "till": till})
    assert store["has_payout_details"] is True
    assert store["payout_details"] == {"method": "mpesa", "till": till}

    async with runtime.db.transaction(read_only=True) as session:
        raw = await session.scalar(
            text("SELECT payout_details_ciphertext FROM sellers WHERE slug = :slug"),
            {"slug": store["slug"]},
        )
    assert raw is not None
    assert till not in raw and "mpesa" not in raw
    assert raw.startswith("v1.")

    await join_store(client, owner.headers, manager, "manager")
    seen_by_manager = (await client.get(PROFILE, headers=manager.headers)).json()
    assert seen_by_manager["has_payout_details"] is True
    assert seen_by_manager["payout_details"] is None
    seen_by_owner = (await client.get(PROFILE, headers=owner.headers)).json()
    assert seen_by_owner["payout_details"] == {"method": "mpesa", "till": till}

    # A ciphertext copied to another store does not decrypt there: it is bound to its row.
    other = await stores.apply(owner, payout_details={"method": "bank", "account": "1"})
    async with runtime.db.transaction() as session:
        await session.execute(
            update(Seller)
            .where(Seller.id == uuid.UUID(other["id"]))
            .values(payout_details_ciphertext=raw)
        )
    failed = await client.get(PROFILE, headers=as_store(owner, other["id"]))
    assert failed.status_code == 500


async def test_a_storefront_shows_only_while_the_store_is_active(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner = await make_user()
    store = await stores.apply(owner, slug="duka-la-juma", description="Vitenge na viatu")
    url = f"{SELLERS}/duka-la-juma"
    assert (await client.get(url)).status_code == 404  # pending

    assert (await stores.decide(store["id"], "approve")).status_code == 200
    shown = await client.get(url)
    assert shown.status_code == 200
    assert shown.json() == {
        "id": store["id"],
        "slug": "duka-la-juma",
        "store_name": store["store_name"],
        "description": "Vitenge na viatu",
        "created_at": store["created_at"],
    }
    assert "contact_email" not in shown.json()
    etag = shown.headers["etag"]
    again = await client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert (await client.get(f"{SELLERS}/DUKA-LA-JUMA")).status_code == 200

    # The cached storefront goes with the suspension, and comes back with reinstatement.
    assert (await stores.decide(store["id"], "suspend")).status_code == 200
    assert (await client.get(url)).status_code == 404
    assert (await stores.decide(store["id"], "reinstate")).status_code == 200
    assert (await client.get(url)).status_code == 200

    # A profile change shows at once, with a new ETag.
    changed = await client.patch(
        PROFILE, json={"description": "Vitenge, viatu na mikoba"}, headers=owner.headers
    )
    assert changed.status_code == 200, changed.text
    fresh = await client.get(url, headers={"If-None-Match": etag})
    assert fresh.status_code == 200
    assert fresh.json()["description"] == "Vitenge, viatu na mikoba"

    for missing in ("no-such-store", "x", "../admin"):
        assert (await client.get(f"{SELLERS}/{missing}")).status_code == 404


async def test_a_rejected_store_has_no_storefront(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    store = await stores.apply(await make_user(), slug="never-open")
    assert (await stores.decide(store["id"], "reject")).status_code == 200
    assert (await client.get(f"{SELLERS}/never-open")).status_code == 404
