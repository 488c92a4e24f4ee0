"""Who sees and touches which orders: buyers their own, stores theirs, the marketplace's
staff all; anyone else's order answers 404 like a missing one."""

from __future__ import annotations

import uuid

import httpx2
import pytest

from soko.identity.models import Role
from tests.identity.conftest import MakeUser
from tests.orders.conftest import (
    ADMIN,
    CHECKOUT,
    ORDERS,
    SELLER_ORDERS,
    Placed,
    PlaceOrder,
    ok,
    refused,
)


@pytest.fixture
async def two(place_order: PlaceOrder) -> tuple[Placed, Placed]:
    return await place_order("paid"), await place_order("pending_payment")


async def test_buyers_see_and_move_only_their_own_orders(
    client: httpx2.AsyncClient, two: tuple[Placed, Placed]
) -> None:
    mine, theirs = two
    listed = ok(await client.get(ORDERS, headers=mine.buyer.headers))
    assert [item["id"] for item in listed["items"]] == [str(mine.order_id)]

    other = f"{ORDERS}/{theirs.order_id}"
    refused(await client.get(other, headers=mine.buyer.headers), 404, "not-found")
    for action in ("cancel", "confirm-delivery"):
        refused(
            await client.post(f"{other}/{action}", headers=mine.buyer.headers), 404, "not-found"
        )
    refused(
        await client.post(
            f"{other}/dispute",
            json={"reason": "other", "details": "?"},
            headers=mine.buyer.headers,
        ),
        404,
        "not-found",
    )
    refused(
        await client.get(f"{CHECKOUT}/{theirs.group_id}", headers=mine.buyer.headers),
        404,
        "not-found",
    )
    refused(
        await client.get(f"{ORDERS}/{uuid.uuid4()}", headers=mine.buyer.headers), 404, "not-found"
    )
    # Untouched.
    assert ok(await client.get(other, headers=theirs.buyer.headers))["status"] == "pending_payment"


async def test_stores_see_and_move_only_their_own_orders(
    client: httpx2.AsyncClient, two: tuple[Placed, Placed], make_user: MakeUser
) -> None:
    mine, theirs = two
    listed = ok(await client.get(SELLER_ORDERS, headers=mine.shop.headers))
    assert [item["id"] for item in listed["items"]] == [str(mine.order_id)]

    other = f"{SELLER_ORDERS}/{theirs.order_id}"
    refused(await client.get(other, headers=mine.shop.headers), 404, "not-found")
    for action in ("accept", "mark-delivered", "cancel"):
        refused(await client.post(f"{other}/{action}", headers=mine.shop.headers), 404, "not-found")
    refused(
        await client.post(
            f"{other}/ship",
            json={"carrier": "x", "tracking_number": "y"},
            headers=mine.shop.headers,
        ),
        404,
        "not-found",
    )
    refused(
        await client.post(
            f"{other}/dispute/response", json={"response": "no"}, headers=mine.shop.headers
        ),
        404,
        "not-found",
    )
    # Someone who acts for no store is told so.
    stranger = await make_user()
    refused(await client.get(SELLER_ORDERS, headers=stranger.headers), 403, "not-a-seller")
    # The buyer's routes do not open a store's order to the store owner either.
    refused(
        await client.get(f"{ORDERS}/{mine.order_id}", headers=mine.shop.headers), 404, "not-found"
    )


async def test_the_marketplace_sees_every_order(
    client: httpx2.AsyncClient, two: tuple[Placed, Placed], make_user: MakeUser
) -> None:
    mine, theirs = two
    for role in (Role.admin, Role.operator, Role.support):
        staff = await make_user(role)
        listed = ok(await client.get(f"{ADMIN}/orders", headers=staff.headers))
        assert {item["id"] for item in listed["items"]} == {
            str(mine.order_id),
            str(theirs.order_id),
        }
        by_store = ok(
            await client.get(
                f"{ADMIN}/orders",
                params={"seller_id": str(theirs.shop.seller_id)},
                headers=staff.headers,
            )
        )
        assert [item["id"] for item in by_store["items"]] == [str(theirs.order_id)]
        by_buyer = ok(
            await client.get(
                f"{ADMIN}/orders",
                params={"buyer_id": str(mine.buyer.user_id)},
                headers=staff.headers,
            )
        )
        assert [item["id"] for item in by_buyer["items"]] == [str(mine.order_id)]
        order = ok(await client.get(f"{ADMIN}/orders/{theirs.order_id}", headers=staff.headers))
        assert order["number"]


@pytest.mark.parametrize(
    ("role", "orders", "disputes"),
    [
        (Role.customer, 403, 403),
        (Role.seller, 403, 403),
        (Role.provider, 403, 403),
        (Role.operator, 200, 403),
        (Role.support, 200, 200),
        (Role.admin, 200, 200),
    ],
)
async def test_the_admin_routes_follow_the_role_matrix(
    client: httpx2.AsyncClient, make_user: MakeUser, role: Role, orders: int, disputes: int
) -> None:
    user = await make_user(role)
    assert (await client.get(f"{ADMIN}/orders", headers=user.headers)).status_code == orders
    assert (await client.get(f"{ADMIN}/disputes", headers=user.headers)).status_code == disputes
    resolve = await client.post(
        f"{ADMIN}/disputes/{uuid.uuid4()}/resolve", json={"outcome": "reject"}, headers=user.headers
    )
    assert resolve.status_code == (404 if disputes == 200 else 403)
    assert (await client.get(ORDERS)).status_code == 401
    assert (await client.get(f"{ADMIN}/orders")).status_code == 401


async def test_lists_page_filter_and_select_fields(
    client: httpx2.AsyncClient, place_order: PlaceOrder
) -> None:
    first = await place_order("paid")
    buyer = first.buyer
    # Two more orders of the same buyer, from the same store.
    for _ in range(2):
        await buyer.new_cart()
        await buyer.add(first.variant_id)
        await buyer.checkout()

    page_one = ok(await client.get(ORDERS, params={"limit": 2}, headers=buyer.headers))
    assert len(page_one["items"]) == 2 and page_one["next_cursor"]
    page_two = ok(
        await client.get(
            ORDERS, params={"limit": 2, "cursor": page_one["next_cursor"]}, headers=buyer.headers
        )
    )
    ids = [item["id"] for item in page_one["items"] + page_two["items"]]
    assert len(set(ids)) == 3 and page_two["next_cursor"] is None
    assert ids[-1] == str(first.order_id)  # newest first

    paid = ok(await client.get(ORDERS, params={"status": "paid"}, headers=buyer.headers))
    assert [item["id"] for item in paid["items"]] == [str(first.order_id)]
    slim = ok(await client.get(ORDERS, params={"fields": "status"}, headers=buyer.headers))
    assert all(set(item) == {"id", "status"} for item in slim["items"])
    # A cursor of the buyer's list does not page a store's list.
    refused(
        await client.get(
            SELLER_ORDERS, params={"cursor": page_one["next_cursor"]}, headers=first.shop.headers
        ),
        400,
        "invalid-cursor",
    )


async def test_an_order_answers_not_modified_while_unchanged(
    client: httpx2.AsyncClient, place_order: PlaceOrder
) -> None:
    placed = await place_order("paid")
    url = f"{ORDERS}/{placed.order_id}"
    first = await client.get(url, headers=placed.buyer.headers)
    etag = first.headers["etag"]
    same = await client.get(url, headers={**placed.buyer.headers, "If-None-Match": etag})
    assert same.status_code == 304
    ok(await client.post(f"{SELLER_ORDERS}/{placed.order_id}/accept", headers=placed.shop.headers))
    changed = await client.get(url, headers={**placed.buyer.headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "processing"
