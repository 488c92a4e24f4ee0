"""The marketplace's review of stores: each decision a compare-and-set on the status,
recorded, published, and audited."""

from __future__ import annotations

import asyncio
import uuid

import httpx2
import pytest

from soko.identity.models import Role
from soko.platform.runtime import Runtime
from tests.identity.admin_support import audit_events
from tests.identity.conftest import MakeUser
from tests.sellers.conftest import ADMIN_SELLERS, OutboxReader, Stores, problem_type


async def roles_of(client: httpx2.AsyncClient, headers: dict[str, str]) -> list[str]:
    response = await client.get("/api/v1/me", headers=headers)
    assert response.status_code == 200, response.text
    roles: list[str] = response.json()["roles"]
    return roles


async def test_approval_makes_the_store_active_and_its_owner_a_seller(
    client: httpx2.AsyncClient,
    make_user: MakeUser,
    stores: Stores,
    published: OutboxReader,
    runtime: Runtime,
) -> None:
    owner = await make_user()
    store = await stores.apply(owner)
    assert await roles_of(client, owner.headers) == ["customer"]

    response = await stores.decide(store["id"], "approve", reason="Documents checked")
    assert response.status_code == 200, response.text
    decided = response.json()
    admin = await stores.admin()
    assert decided["status"] == "active"
    assert decided["status_reason"] == "Documents checked"
    assert decided["reviewed_by"] == str(admin.user_id)
    assert decided["version"] == 2
    assert [(h["from_status"], h["to_status"]) for h in decided["history"]] == [
        (None, "pending"),
        ("pending", "active"),
    ]
    assert decided["history"][1]["actor_id"] == str(admin.user_id)
    assert decided["members"] == [
        {
            "user_id": str(owner.user_id),
            "display_name": "Test user",
            "role": "owner",
            "added_at": decided["members"][0]["added_at"],
            "added_by": str(owner.user_id),
        }
    ]
    assert sorted(await roles_of(client, owner.headers)) == ["customer", "seller"]
    assert await published("seller.approved") == [
        {"seller_id": store["id"], "actor_id": str(admin.user_id), "reason": "Documents checked"}
    ]
    [audit] = await audit_events(runtime, "seller.approved", store["id"])
    assert audit.actor_id == admin.user_id


@pytest.mark.parametrize(
    ("steps", "action", "current"),
    [
        ((), "suspend", "pending"),
        ((), "reinstate", "pending"),
        (("approve",), "approve", "active"),
        (("approve",), "reject", "active"),
        (("approve",), "reinstate", "active"),
        (("reject",), "approve", "rejected"),
        (("reject",), "suspend", "rejected"),
        (("approve", "suspend"), "suspend", "suspended"),
        (("approve", "suspend"), "approve", "suspended"),
    ],
)
async def test_a_decision_in_the_wrong_state_is_a_conflict(
    make_user: MakeUser,
    stores: Stores,
    steps: tuple[str, ...],
    action: str,
    current: str,
) -> None:
    store = await stores.apply(await make_user())
    for step in steps:
        assert (await stores.decide(store["id"], step)).status_code == 200
    response = await stores.decide(store["id"], action)
    assert response.status_code == 409
    assert problem_type(response) == "seller-state-conflict"
    assert response.json()["current_status"] == current
    article = "an" if current == "active" else "a"
    assert response.json()["detail"] == f"Cannot {action} {article} {current} store."


async def test_every_decision_is_recorded_and_published(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores, published: OutboxReader
) -> None:
    store = await stores.apply(await make_user())
    for action, status in (
        ("approve", "active"),
        ("suspend", "suspended"),
        ("reinstate", "active"),
    ):
        response = await stores.decide(store["id"], action, reason=f"why {action}")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == status
    detail = (
        await client.get(f"{ADMIN_SELLERS}/{store['id']}", headers=(await stores.admin()).headers)
    ).json()
    assert [(h["to_status"], h["reason"]) for h in detail["history"]] == [
        ("pending", ""),
        ("active", "why approve"),
        ("suspended", "why suspend"),
        ("active", "why reinstate"),
    ]
    for name, reason in (
        ("seller.suspended", "why suspend"),
        ("seller.reinstated", "why reinstate"),
    ):
        [event] = await published(name)
        assert event["seller_id"] == store["id"]
        assert event["reason"] == reason

    rejected = await stores.apply(await make_user())
    assert (await stores.decide(rejected["id"], "reject", reason="Blurry ID")).status_code == 200
    [event] = await published("seller.rejected")
    assert event == {
        "seller_id": rejected["id"],
        "actor_id": str((await stores.admin()).user_id),
        "reason": "Blurry ID",
    }


async def test_reject_and_suspend_need_a_reason(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    store = await stores.apply(await make_user())
    admin = await stores.admin()
    for action in ("reject", "suspend"):
        for body in ({}, {"reason": "   "}):
            response = await client.post(
                f"{ADMIN_SELLERS}/{store['id']}/{action}", json=body, headers=admin.headers
            )
            assert response.status_code == 422, (action, body)
    approved = await client.post(
        f"{ADMIN_SELLERS}/{store['id']}/approve", json={}, headers=admin.headers
    )
    assert approved.status_code == 200


async def test_deciding_about_an_unknown_store_is_not_found(stores: Stores) -> None:
    for action in ("approve", "reject", "suspend", "reinstate"):
        response = await stores.decide(uuid.uuid4(), action)
        assert response.status_code == 404, action


async def test_two_reviewers_deciding_at_once_make_one_decision(
    make_user: MakeUser, stores: Stores, published: OutboxReader
) -> None:
    store = await stores.apply(await make_user())
    responses = await asyncio.gather(
        stores.decide(store["id"], "approve"),
        stores.decide(store["id"], "reject"),
        stores.decide(store["id"], "approve"),
    )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 409, 409]
    [winner] = [response.json() for response in responses if response.status_code == 200]
    assert len(winner["history"]) == 2
    events = await published("seller.approved") + await published("seller.rejected")
    assert len(events) == 1


async def test_only_reviewers_see_and_decide(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner = await make_user()
    store = await stores.apply(owner)
    for role in (Role.customer, Role.seller, Role.support):
        user = await make_user(role)
        listed = await client.get(ADMIN_SELLERS, headers=user.headers)
        assert listed.status_code == 403
        decided = await client.post(
            f"{ADMIN_SELLERS}/{store['id']}/approve", json={}, headers=user.headers
        )
        assert decided.status_code == 403
        assert problem_type(decided) == "forbidden"
    operator = await make_user(Role.operator)
    response = await client.post(
        f"{ADMIN_SELLERS}/{store['id']}/approve", json={}, headers=operator.headers
    )
    assert response.status_code == 200


async def test_the_review_queue_lists_by_status_newest_first(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    created = [await stores.apply(await make_user()) for _ in range(5)]
    assert (await stores.decide(created[1]["id"], "approve")).status_code == 200
    admin = await stores.admin()

    pending_ids: list[str] = []
    cursor = None
    while True:
        params = {"status": "pending", "limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get(ADMIN_SELLERS, params=params, headers=admin.headers)).json()
        pending_ids += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    expected = [store["id"] for store in reversed(created) if store is not created[1]]
    assert pending_ids == expected

    everything = (await client.get(ADMIN_SELLERS, headers=admin.headers)).json()["items"]
    assert [item["id"] for item in everything] == [store["id"] for store in reversed(created)]
    trimmed = await client.get(
        ADMIN_SELLERS, params={"status": "active", "fields": "slug"}, headers=admin.headers
    )
    assert trimmed.json()["items"] == [{"id": created[1]["id"], "slug": created[1]["slug"]}]
    assert "payout_details" not in everything[0]

    # A cursor of one list does not page through another.
    first = (
        await client.get(
            ADMIN_SELLERS, params={"status": "pending", "limit": "1"}, headers=admin.headers
        )
    ).json()
    crossed = await client.get(
        ADMIN_SELLERS,
        params={"status": "active", "cursor": first["next_cursor"]},
        headers=admin.headers,
    )
    assert problem_type(crossed) == "invalid-cursor"
    bad = await client.get(ADMIN_SELLERS, params={"status": "open"}, headers=admin.headers)
    assert bad.status_code == 422


async def test_a_suspended_stores_products_leave_the_catalog_at_once(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    """The catalog caches its listing with SELLERS_TAG; each decision drops it."""
    owner = await make_user()
    store = await stores.active(owner)
    product = await client.post(
        "/api/v1/seller/products",
        json={
            "title": "Kiondo basket",
            "variants": [{"sku": "KIONDO-M", "price": {"amount": 140000, "currency": "KES"}}],
        },
        headers=owner.headers,
    )
    assert product.status_code == 201, product.text
    published = await client.post(
        f"/api/v1/seller/products/{product.json()['id']}/publish", headers=owner.headers
    )
    assert published.status_code == 200, published.text

    async def listed() -> list[str]:
        page = await client.get("/api/v1/products", params={"seller": store["id"]})
        assert page.status_code == 200, page.text
        return [item["id"] for item in page.json()["items"]]

    assert await listed() == [product.json()["id"]]
    assert (await stores.decide(store["id"], "suspend")).status_code == 200
    assert await listed() == []
    detail = await client.get(f"/api/v1/products/{product.json()['id']}")
    assert detail.status_code == 404
    assert (await stores.decide(store["id"], "reinstate")).status_code == 200
    assert await listed() == [product.json()["id"]]
