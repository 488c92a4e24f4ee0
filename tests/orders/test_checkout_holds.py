"""Where a checkout holds its stock. On PostgreSQL the hold is committed on its own before
the checkout writes anything, so a popular item's stock row is never locked while the
checkout's transaction goes on; when that transaction does not commit, the hold is given
back. On SQLite the hold is the last write of the checkout's transaction."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import capture_logs

from soko.cart.models import Cart
from soko.identity.models import User
from soko.inventory.models import Reservation, StockLevel
from soko.orders import checkout
from soko.orders.models import CheckoutGroup, Order, OrderLine
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import ROLLBACK_CALLBACKS_KEY, Runtime
from tests.cart.catalog_support import Market
from tests.conftest import sql_statements
from tests.orders.conftest import Buyer, MakeBuyer, available, count, ok, refused

postgresql_only = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgresql)]
)


async def holds(runtime: Runtime, variant_id: uuid.UUID) -> list[tuple[str, int]]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(Reservation.status, Reservation.quantity)
            .where(Reservation.variant_id == variant_id)
            .order_by(Reservation.status)
        )
        return [(status, quantity) for status, quantity in rows]


async def reserved(runtime: Runtime, variant_id: uuid.UUID) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        total = await session.scalar(
            select(func.sum(StockLevel.reserved)).where(StockLevel.variant_id == variant_id)
        )
        return int(total or 0)


def during_the_writes(monkeypatch: pytest.MonkeyPatch, step: Callable[[], Awaitable[None]]) -> None:
    """Run ``step`` while the checkout's transaction writes: on PostgreSQL just before
    its one statement of writes, elsewhere just before its ``order.placed`` events are
    written."""
    for name in ("_write_in_one", "write_event_rows"):
        write = getattr(checkout, name)

        async def step_then_write(*args: Any, _write: Any = write, **kwargs: Any) -> Any:
            await step()
            return await _write(*args, **kwargs)

        monkeypatch.setattr(checkout, name, step_then_write)


async def goes_through_when_undone(
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    buyer: Buyer,
    variant_id: uuid.UUID,
    *,
    left: int,
) -> None:
    """With the interference undone, the same checkout is placed, leaving ``left`` units."""
    monkeypatch.undo()
    ok(await buyer.post_checkout(), 201)
    assert (await available(runtime, variant_id))[variant_id] == left


async def post_failing(post: Awaitable[httpx2.Response]) -> int:
    """The status of a request whose handler raised: 500, or the error itself when the
    test transport lets it through."""
    try:
        return (await post).status_code
    except (RuntimeError, ConnectionResetError):
        return 500


async def test_a_checkout_whose_writes_fail_gives_its_stock_back(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    variant_id = await market.variant(stock=5)
    buyer = await make_buyer((variant_id, 2))

    async def fail() -> None:
        raise RuntimeError("the outbox table is gone")

    during_the_writes(monkeypatch, fail)
    with capture_logs() as logs:
        assert await post_failing(buyer.post_checkout()) == 500

    assert await count(runtime, CheckoutGroup) == 0
    assert await count(runtime, Order) == 0
    assert (await available(runtime, variant_id))[variant_id] == 5
    assert await reserved(runtime, variant_id) == 0
    # On PostgreSQL the hold was committed, then given back; on SQLite it was never
    # written (it comes last in the transaction that failed).
    given_back = [log for log in logs if log["event"] == "checkout_hold_given_back"]
    if runtime.db.dialect == "postgresql":
        assert await holds(runtime, variant_id) == [("released", 2)]
        assert [log["units"] for log in given_back] == [2]
    else:
        assert await holds(runtime, variant_id) == []
        assert given_back == []

    await goes_through_when_undone(runtime, monkeypatch, buyer, variant_id, left=3)


@postgresql_only
async def test_the_hold_is_committed_before_the_writes_and_the_row_left_unlocked(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection, while the checkout writes its orders, already sees the hold
    and can lock the stock row at once: the next buyer of the item does not wait for
    this checkout's transaction."""
    variant_id = await market.variant(stock=5)
    buyer = await make_buyer((variant_id, 2))
    seen: list[Any] = []

    async def look() -> None:
        async with runtime.db.engine.connect() as other:
            # NOWAIT: an error, not a wait, if the row were locked.
            row = await other.execute(
                text(
                    "SELECT reserved FROM inventory_stock_levels "
                    "WHERE variant_id = :variant_id FOR UPDATE NOWAIT"
                ),
                {"variant_id": variant_id},
            )
            seen.append(row.scalar_one())
            seen.append(
                await other.scalar(
                    select(func.count())
                    .select_from(Reservation)
                    .where(Reservation.variant_id == variant_id, Reservation.status == "held")
                )
            )
            await other.rollback()

    during_the_writes(monkeypatch, look)
    ok(await buyer.post_checkout(), 201)

    assert seen == [2, 1]
    assert await holds(runtime, variant_id) == [("held", 2)]


@postgresql_only
async def test_a_commit_whose_answer_was_lost_keeps_its_hold(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkout's COMMIT went through but its answer never came back (a dropped
    connection): the group exists, so the hold it was placed with stays."""
    variant_id = await market.variant(stock=5)
    buyer = await make_buyer((variant_id, 2))
    commit = AsyncSession.commit

    async def commit_then_lose_the_answer(self: AsyncSession) -> None:
        await commit(self)
        if self.info.get(ROLLBACK_CALLBACKS_KEY):  # the checkout's transaction
            raise ConnectionResetError("connection lost after COMMIT")

    monkeypatch.setattr(AsyncSession, "commit", commit_then_lose_the_answer)
    # A lost database connection: 503, retry later.
    assert await post_failing(buyer.post_checkout()) == 503
    monkeypatch.undo()

    assert await count(runtime, CheckoutGroup) == 1
    assert await holds(runtime, variant_id) == [("held", 2)]
    assert (await available(runtime, variant_id))[variant_id] == 3


@postgresql_only
async def test_a_retry_after_an_attempt_died_holding_stock_gives_that_stock_back(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process placing a checkout died after its hold was committed and before its
    writes (nothing of it runs again, nothing gives the hold back). The client retries
    with the same key once the claim's lease has run out: the retry takes the claim
    over, gives back what the dead attempt held and places the checkout, which holds
    the units once, and is not refused for stock its own first attempt took."""
    variant_id = await market.variant(stock=5)
    buyer = await make_buyer((variant_id, 4))
    held = asyncio.Event()
    never = asyncio.Event()

    async def die() -> None:
        held.set()
        await never.wait()  # as good as dead: no write, no cleanup

    during_the_writes(monkeypatch, die)
    dead = asyncio.create_task(buyer.post_checkout(key="retried-key"))
    await asyncio.wait_for(held.wait(), 30)
    monkeypatch.undo()
    assert await reserved(runtime, variant_id) == 4
    assert (await available(runtime, variant_id))[variant_id] == 1

    in_flight = await buyer.post_checkout(key="retried-key")
    assert (in_flight.status_code, in_flight.json()["type"]) == (
        409,
        "/problems/idempotency-in-flight",
    )
    runtime.clock.advance(61)  # type: ignore[attr-defined]  # past the claim's lease
    with capture_logs() as logs:
        placed = ok(await buyer.post_checkout(key="retried-key"), 201)
    assert await count(runtime, CheckoutGroup) == 1
    assert await reserved(runtime, variant_id) == 4
    assert (await available(runtime, variant_id))[variant_id] == 1
    assert await holds(runtime, variant_id) == [("held", 4), ("released", 4)]
    given_back = [log for log in logs if log["event"] == "checkout_hold_given_back"]
    assert [(log["units"], log["reason"]) for log in given_back] == [
        (4, "checkout attempt abandoned")
    ]
    # The answer is the key's for good; the dead attempt, ended at last, changes nothing.
    replay = await buyer.post_checkout(key="retried-key")
    assert replay.status_code == 201 and replay.json()["id"] == placed["id"]
    dead.cancel()
    with contextlib.suppress(asyncio.CancelledError, RuntimeError, ConnectionResetError):
        await dead
    assert await count(runtime, CheckoutGroup) == 1
    assert await reserved(runtime, variant_id) == 4


async def test_two_checkouts_of_one_cart_at_once_hold_its_stock_once(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    """Two keys, one cart: one checkout converts the cart, the other is refused, and
    what the refused one held (on PostgreSQL, before it found the cart taken) is given
    back."""
    variant_id = await market.variant(stock=10)
    buyer = await make_buyer((variant_id, 3))

    answers = await asyncio.gather(buyer.post_checkout(), buyer.post_checkout())

    statuses = sorted(answer.status_code for answer in answers)
    assert statuses[0] == 201 and 400 <= statuses[1] < 500, [a.text for a in answers]
    assert await count(runtime, CheckoutGroup) == 1
    assert await reserved(runtime, variant_id) == 3
    assert (await available(runtime, variant_id))[variant_id] == 7
    assert ("held", 3) in await holds(runtime, variant_id)


@postgresql_only
async def test_a_hold_whose_answer_was_lost_is_given_back(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold went through but the checkout never heard (the connection dropped after
    its commit): the undo was registered before the hold, so the units come back."""
    variant_id = await market.variant(stock=5)
    buyer = await make_buyer((variant_id, 2))
    reserve_committed = checkout.reserve_committed

    async def hold_then_lose_the_answer(*args: Any, **kwargs: Any) -> None:
        await reserve_committed(*args, **kwargs)
        raise ConnectionResetError("connection lost after the hold")

    monkeypatch.setattr(checkout, "reserve_committed", hold_then_lose_the_answer)
    assert await post_failing(buyer.post_checkout()) == 503  # a lost connection

    assert await count(runtime, CheckoutGroup) == 0
    assert await holds(runtime, variant_id) == [("released", 2)]
    assert (await available(runtime, variant_id))[variant_id] == 5


@postgresql_only
async def test_a_hold_refused_for_want_of_stock_has_nothing_to_give_back(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another buyer took the last units between the read and the hold: the hold is
    refused whole, the answer is out-of-stock, and no undo runs (a refused hold holds
    nothing)."""
    variant_id = await market.variant(stock=3)
    buyer, rival = await make_buyer((variant_id, 2)), await make_buyer((variant_id, 2))
    reserve_committed = checkout.reserve_committed

    async def rival_first(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(checkout, "reserve_committed", reserve_committed)
        ok(await rival.post_checkout(), 201)
        await reserve_committed(*args, **kwargs)

    monkeypatch.setattr(checkout, "reserve_committed", rival_first)
    with sql_statements(runtime) as sent, capture_logs() as logs:
        response = await buyer.post_checkout()
    assert response.status_code == 409, response.text
    lookups = [
        statement
        for statement in sent
        if statement.lstrip().startswith("SELECT") and "FROM orders_checkout_groups" in statement
    ]
    assert lookups == [], lookups
    assert response.json()["shortages"] == [
        {"variant_id": str(variant_id), "requested": 2, "available": 1}
    ]
    assert not [log for log in logs if log["event"] == "checkout_hold_given_back"]
    assert await count(runtime, CheckoutGroup) == 1
    assert await holds(runtime, variant_id) == [("held", 2)]


async def change(runtime: Runtime, statement: str, **parameters: Any) -> None:
    """Run ``statement`` on a connection of its own, committed."""
    async with runtime.db.engine.begin() as other:
        await other.execute(text(statement), parameters)


async def nothing_written(runtime: Runtime, cart_id: uuid.UUID) -> None:
    """No group, order, line or ``order.placed``, and the cart still open."""
    for model in (CheckoutGroup, Order, OrderLine):
        assert await count(runtime, model) == 0
    async with runtime.db.transaction(read_only=True) as session:
        placed = await session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.name == "order.placed")
        )
        status = await session.scalar(select(Cart.status).where(Cart.id == cart_id))
    assert (placed, status) == (0, "open")


@postgresql_only
async def test_a_store_that_stops_selling_before_the_writes_gets_no_order(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store was active when the checkout read the cart and suspended before it
    wrote: the one statement writes nothing, the buyer is told which item, and the
    stock held for it comes back."""
    shop = await market.open_shop()
    variant_id = (await shop.list_product(500, stock=5)).variant_id
    buyer = await make_buyer((variant_id, 2))

    async def suspend() -> None:
        await change(
            runtime, "UPDATE sellers SET status = 'suspended' WHERE id = :id", id=shop.seller_id
        )

    during_the_writes(monkeypatch, suspend)
    problem = refused(await buyer.post_checkout(), 409, "checkout-items-unavailable")

    assert problem["unavailable"] == [
        {"variant_id": str(variant_id), "reason": "seller_not_selling"}
    ]
    await nothing_written(runtime, buyer.cart_id)
    assert (await available(runtime, variant_id))[variant_id] == 5
    assert await holds(runtime, variant_id) == [("released", 2)]


@postgresql_only
async def test_a_cart_that_moved_before_the_writes_gets_no_order(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cart changed after the checkout read it (another tab added a line): nothing
    is written, the buyer is told to read the cart again, and the stock comes back; a
    checkout of the cart as it is now goes through."""
    variant_id = await market.variant(stock=5)
    buyer = await make_buyer((variant_id, 2))

    async def move_the_cart() -> None:
        await change(
            runtime, "UPDATE carts SET version = version + 1 WHERE id = :id", id=buyer.cart_id
        )

    during_the_writes(monkeypatch, move_the_cart)
    refused(await buyer.post_checkout(), 409, "cart-changed")

    await nothing_written(runtime, buyer.cart_id)
    assert (await available(runtime, variant_id))[variant_id] == 5
    assert await holds(runtime, variant_id) == [("released", 2)]

    await goes_through_when_undone(runtime, monkeypatch, buyer, variant_id, left=3)


@postgresql_only
async def test_a_claim_taken_over_before_the_writes_writes_nothing(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writes and the stored answer are one statement on PostgreSQL. When a retry
    took the Idempotency-Key over first (this request's lease ran out), that statement
    writes nothing: no order, no answer, the cart still open, the hold given back."""
    variant_id = await market.variant(stock=5)
    buyer = await make_buyer((variant_id, 2))

    async def take_the_claim_over() -> None:
        await change(
            runtime, "UPDATE idempotency_keys SET claim_token = :token", token=uuid.uuid4()
        )

    during_the_writes(monkeypatch, take_the_claim_over)
    refused(await buyer.post_checkout(key="taken-over"), 409, "idempotency-in-flight")

    await nothing_written(runtime, buyer.cart_id)
    async with runtime.db.transaction(read_only=True) as session:
        keys = (
            await session.execute(text("SELECT status, response_status FROM idempotency_keys"))
        ).all()
    assert [tuple(key) for key in keys] == [("in_flight", None)]
    assert (await available(runtime, variant_id))[variant_id] == 5
    assert await holds(runtime, variant_id) == [("released", 2)]


async def test_an_account_without_a_verified_contact_cannot_hold_stock(
    runtime: Runtime,
    market: Market,
    make_buyer: MakeBuyer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkout holds stock: a throwaway account (anyone's email, never verified)
    could hold a store's whole stock, again and again. It is refused, holding nothing,
    its cart left as it was; verified, the same account checks out."""
    variant_id = await market.variant(stock=5)
    buyer = await make_buyer((variant_id, 5), verified=False)

    refused = await buyer.post_checkout(key="unverified")
    assert refused.status_code == 403, refused.text
    assert refused.json()["type"] == "/problems/checkout-contact-unverified"
    assert await count(runtime, CheckoutGroup) == 0
    assert (await available(runtime, variant_id))[variant_id] == 5
    assert await reserved(runtime, variant_id) == 0
    async with runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(select(Cart.status).where(Cart.id == buyer.cart_id)) == "open"

    async with runtime.transaction() as session:  # the emailed link, followed
        await session.execute(
            update(User)
            .where(User.id == buyer.user.user_id)
            .values(email_verified_at=runtime.clock.now())
        )
    ok(await buyer.post_checkout(key="verified"), 201)
    assert (await available(runtime, variant_id))[variant_id] == 0


async def test_the_operator_may_let_any_account_check_out(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.settings, "checkout_requires_verified_contact", False)
    variant_id = await market.variant(stock=2)
    buyer = await make_buyer((variant_id, 1), verified=False)
    ok(await buyer.post_checkout(), 201)
    assert (await available(runtime, variant_id))[variant_id] == 1
