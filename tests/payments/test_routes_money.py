"""Balances, payouts, commission and the ledger check over HTTP: who may see and do
what, idempotent payouts, refusals beyond the balance, and commission changes that only
reach later captures."""

from __future__ import annotations

import uuid

import httpx2
from sqlalchemy import func, select

from soko.identity.models import AuditEvent, Role
from soko.payments import ledger
from soko.payments.ledger import SellerShare
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market, market  # noqa: F401
from tests.identity.conftest import MakeUser, make_user  # noqa: F401
from tests.orders.conftest import ok, refused

API = "/api/v1"
BALANCE = f"{API}/seller/balance"
PAYOUTS = f"{API}/admin/payouts"
KES = "KES"


async def capture(runtime: Runtime, seller_id: uuid.UUID, gross: int) -> uuid.UUID:
    """A payment's capture for one order of the store, as payments posts it."""
    order_id = uuid7()
    async with runtime.db.transaction() as session:
        await ledger.post_capture(
            session,
            runtime,
            payment_id=uuid7(),
            provider="sandbox",
            currency=KES,
            amount_minor=gross,
            shares=[SellerShare(seller_id, order_id, gross)],
        )
    return order_id


def payout_body(
    seller_id: uuid.UUID, amount: int, reference: str = "MPESA-001"
) -> dict[str, object]:
    return {
        "seller_id": str(seller_id),
        "amount_minor": amount,
        "currency": KES,
        "reference": reference,
        "note": "weekly payout",
    }


async def test_a_store_member_reads_the_balance_and_pages_its_history(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    market: Market,  # noqa: F811
    make_user: MakeUser,  # noqa: F811
) -> None:
    shop = await market.open_shop()
    other = await market.open_shop()
    await capture(runtime, shop.seller_id, 10_000)
    await capture(runtime, shop.seller_id, 2_000)
    await capture(runtime, other.seller_id, 5_000)

    first = ok(await client.get(BALANCE, params={"limit": 1}, headers=shop.headers))
    assert first["seller_id"] == str(shop.seller_id)
    assert first["balances"] == [{"currency": KES, "balance_minor": 9_000 + 1_800}]
    assert [(item["kind"], item["amount_minor"]) for item in first["items"]] == [("capture", 1_800)]
    assert first["items"][0]["rate_bps"] == 1000
    second = ok(
        await client.get(
            BALANCE, params={"limit": 1, "cursor": first["next_cursor"]}, headers=shop.headers
        )
    )
    assert [item["amount_minor"] for item in second["items"]] == [9_000]
    assert second["next_cursor"] is None

    # A cursor of one store's history does not page another's.
    foreign = await client.get(
        BALANCE, params={"cursor": first["next_cursor"]}, headers=other.headers
    )
    refused(foreign, 400, "invalid-cursor")
    # A user who is not a member never sees the store's balance.
    stranger = await make_user()
    refused(
        await client.get(BALANCE, headers={**stranger.headers, "X-Seller-Id": str(shop.seller_id)}),
        403,
        "not-a-seller",
    )
    refused(
        await client.get(
            BALANCE, headers={**other.owner.headers, "X-Seller-Id": str(shop.seller_id)}
        ),
        403,
        "not-a-seller",
    )
    refused(await client.get(BALANCE), 401, "unauthorized")
    assert ok(await client.get(BALANCE, headers=other.headers))["balances"] == [
        {"currency": KES, "balance_minor": 4_500}
    ]


async def test_an_admin_records_a_payout_once_and_never_beyond_the_balance(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    market: Market,  # noqa: F811
    make_user: MakeUser,  # noqa: F811
) -> None:
    shop = await market.open_shop()
    await capture(runtime, shop.seller_id, 10_000)  # 9 000 owed
    admin = await make_user(Role.admin)
    key = {"Idempotency-Key": str(uuid.uuid4())}

    created = ok(
        await client.post(
            PAYOUTS, json=payout_body(shop.seller_id, 6_000), headers={**admin.headers, **key}
        ),
        201,
    )
    assert created["balance_after_minor"] == 3_000
    assert created["recorded_by"] == str(admin.user_id)
    replay = await client.post(
        PAYOUTS, json=payout_body(shop.seller_id, 6_000), headers={**admin.headers, **key}
    )
    assert replay.status_code == 201 and replay.headers["Idempotency-Replayed"] == "true"
    assert replay.json()["id"] == created["id"]
    refused(
        await client.post(
            PAYOUTS, json=payout_body(shop.seller_id, 100), headers={**admin.headers, **key}
        ),
        422,
        "idempotency-key-reused",
    )

    def fresh() -> dict[str, str]:
        return {**admin.headers, "Idempotency-Key": str(uuid.uuid4())}

    over = refused(
        await client.post(PAYOUTS, json=payout_body(shop.seller_id, 3_001, "B-2"), headers=fresh()),
        409,
        "payout-exceeds-balance",
    )
    assert over["balance_minor"] == 3_000
    again = refused(
        await client.post(PAYOUTS, json=payout_body(shop.seller_id, 10), headers=fresh()),
        409,
        "payout-already-recorded",
    )
    assert again["payout_id"] == created["id"]
    refused(
        await client.post(PAYOUTS, json=payout_body(uuid7(), 10, "B-3"), headers=fresh()),
        404,
        "not-found",
    )
    refused(
        await client.post(
            PAYOUTS,
            json={**payout_body(shop.seller_id, 10, "B-4"), "currency": "XXZ"},
            headers=fresh(),
        ),
        422,
        "validation-error",
    )
    ok(
        await client.post(PAYOUTS, json=payout_body(shop.seller_id, 3_000, "B-5"), headers=fresh()),
        201,
    )

    balance = ok(await client.get(BALANCE, headers=shop.headers))
    assert balance["balances"] == [{"currency": KES, "balance_minor": 0}]
    assert [item["kind"] for item in balance["items"]] == ["payout", "payout", "capture"]

    listed = ok(
        await client.get(PAYOUTS, params={"seller_id": str(shop.seller_id)}, headers=admin.headers)
    )
    assert [item["reference"] for item in listed["items"]] == ["B-5", "MPESA-001"]
    assert (
        ok(await client.get(PAYOUTS, params={"seller_id": str(uuid7())}, headers=admin.headers))[
            "items"
        ]
        == []
    )
    async with runtime.db.transaction(read_only=True) as session:
        audited = await session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "payout.recorded")
        )
    assert audited == 2


async def test_payouts_and_balances_need_their_permissions(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    market: Market,  # noqa: F811
    make_user: MakeUser,  # noqa: F811
) -> None:
    shop = await market.open_shop()
    await capture(runtime, shop.seller_id, 1_000)
    support = await make_user(Role.support)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    for user in (support, shop.owner):
        refused(
            await client.post(
                PAYOUTS, json=payout_body(shop.seller_id, 10), headers={**user.headers, **key}
            ),
            403,
            "forbidden",
        )
    # Support reads balances, payouts and the ledger check; the store's owner does not.
    admin_balance = f"{API}/admin/sellers/{shop.seller_id}/balance"
    assert ok(await client.get(admin_balance, headers=support.headers))["balances"] == [
        {"currency": KES, "balance_minor": 900}
    ]
    ok(await client.get(PAYOUTS, headers=support.headers))
    refused(await client.get(admin_balance, headers=shop.owner.headers), 403, "forbidden")
    refused(await client.get(PAYOUTS, headers=shop.owner.headers), 403, "forbidden")
    refused(
        await client.get(f"{API}/admin/sellers/{uuid7()}/balance", headers=support.headers),
        404,
        "not-found",
    )
    check = ok(await client.get(f"{API}/admin/ledger/check", headers=support.headers))
    assert check["balanced"] is True and check["trial_balance"] == {KES: 0}
    assert check["entries"] == 3 and check["unbalanced_transaction_ids"] == []
    refused(
        await client.get(f"{API}/admin/ledger/check", headers=shop.owner.headers), 403, "forbidden"
    )


async def test_a_commission_change_reaches_later_captures_only(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    market: Market,  # noqa: F811
    make_user: MakeUser,  # noqa: F811
) -> None:
    shop = await market.open_shop()
    admin = await make_user(Role.admin)
    support = await make_user(Role.support)
    commission = f"{API}/admin/sellers/{shop.seller_id}/commission"

    default = ok(await client.get(commission, headers=support.headers))
    assert (default["rate_bps"], default["overridden"]) == (1000, False)
    await capture(runtime, shop.seller_id, 10_000)  # at 10 %

    refused(
        await client.put(commission, json={"rate_bps": 250}, headers=support.headers),
        403,
        "forbidden",
    )
    changed = ok(await client.put(commission, json={"rate_bps": 250}, headers=admin.headers))
    assert (changed["rate_bps"], changed["overridden"], changed["default_rate_bps"]) == (
        250,
        True,
        1000,
    )
    assert changed["updated_by"] == str(admin.user_id)
    await capture(runtime, shop.seller_id, 10_000)  # at 2.5 %

    history = ok(await client.get(BALANCE, headers=shop.headers))
    assert history["balances"] == [{"currency": KES, "balance_minor": 9_000 + 9_750}]
    assert [(item["amount_minor"], item["rate_bps"]) for item in history["items"]] == [
        (9_750, 250),
        (9_000, 1000),
    ]
    for bad in (-1, 10_001, "ten"):
        refused(
            await client.put(commission, json={"rate_bps": bad}, headers=admin.headers),
            422,
            "validation-error",
        )
    refused(
        await client.put(
            f"{API}/admin/sellers/{uuid7()}/commission", json={"rate_bps": 5}, headers=admin.headers
        ),
        404,
        "not-found",
    )
    reset = ok(await client.put(commission, json={"rate_bps": None}, headers=admin.headers))
    assert (reset["rate_bps"], reset["overridden"]) == (1000, False)
    async with runtime.db.transaction(read_only=True) as session:
        audited = await session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "commission.changed")
        )
    assert audited == 2
