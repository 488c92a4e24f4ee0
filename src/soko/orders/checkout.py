"""Checkout: a buyer's cart becomes one checkout group, one order per seller, and stock
held until the group is paid.

Statements are counted (a checkout must stay within 15 whatever the number of lines and
sellers, the idempotency claim included) and the stock rows of a popular item are the
one thing many checkouts fight over. So a checkout reads each other domain once (the
cart, its variants), checks the sellers inside the statement that writes, and holds the
stock so that its rows stay locked for as short a time as possible: on PostgreSQL in a
statement committed on its own before the writes (given back if they do not happen), on
SQLite last in the checkout's transaction (see :func:`holds_apart`). On PostgreSQL the
writes, the idempotency answer included, are then one autocommitted statement (ADR
0017); on SQLite each table gets one statement in a transaction.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import structlog
from sqlalchemy import (
    ARRAY,
    Boolean,
    Uuid,
    and_,
    any_,
    bindparam,
    exists,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import JSONResponse

from soko.cart.public import (
    CartChanged,
    CartForCheckout,
    cart_for_checkout,
    converting_statement,
    mark_converted,
)
from soko.catalog.public import VariantForSale, variants_for_sale
from soko.identity.public import is_reachable, reachable_user
from soko.inventory.public import (
    OutOfStock,
    ReservationRequest,
    Shortage,
    release_hold,
    reserve,
    reserve_committed,
)
from soko.orders.errors import (
    CartPricesChanged,
    CheckoutCartEmpty,
    CheckoutItemsUnavailable,
    CheckoutNeedsVerifiedContact,
    CheckoutTotalChanged,
    CheckoutTotalTooLarge,
)
from soko.orders.events import ORDER_PLACED, OrderPlaced
from soko.orders.models import CheckoutGroup, GroupStatus, Order, OrderLine
from soko.orders.states import INITIAL_STATE
from soko.platform.db import unnest_insert, unnest_parameters
from soko.platform.idempotency import (
    IdempotentRequest,
    answering_statement,
    held_claim_statement,
)
from soko.platform.ids import uuid7
from soko.platform.money import MAX_AMOUNT_MINOR
from soko.platform.outbox import (
    event_rows,
    publishing_insert,
    publishing_parameters,
    session_now,
    write_event_rows,
)
from soko.platform.runtime import Runtime, on_rollback
from soko.sellers.public import active_seller_ids, inactive_seller_ids

log = structlog.get_logger("soko.orders")

# Crockford's base32: no I, L, O or U, so a number read out on the phone is unambiguous.
_NUMBER_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def order_number() -> str:
    """A short random order reference, ``SK-XXXXX-XXXXX`` (50 random bits)."""
    chars = "".join(secrets.choice(_NUMBER_ALPHABET) for _ in range(10))
    return f"SK-{chars[:5]}-{chars[5:]}"


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    cart_id: uuid.UUID
    accept_price_changes: bool = False
    expected_total_minor: int | None = None
    shipping_address: Mapping[str, Any] | None = None


@dataclass(slots=True)
class PlacedCheckout:
    """What a checkout created, as written (nothing is read back), and whether its
    stock is held already."""

    group: CheckoutGroup
    orders: list[Order]
    lines: dict[uuid.UUID, list[OrderLine]] = field(default_factory=dict)
    held: bool = False
    # The response, when the checkout's writes stored it on the idempotency claim too.
    response: JSONResponse | None = None

    def all_lines(self) -> list[OrderLine]:
        return [line for order in self.orders for line in self.lines[order.id]]

    def reservation_lines(self) -> list[ReservationRequest]:
        return [
            ReservationRequest(variant_id=line.variant_id, quantity=line.quantity)
            for line in self.all_lines()
        ]


def _unavailable_reason(
    variant: VariantForSale | None, currency: str, inactive: set[uuid.UUID]
) -> str | None:
    if variant is None:
        return "unknown"
    if variant.seller_id in inactive:
        return "seller_not_selling"
    if not variant.purchasable:
        return "not_for_sale"
    if variant.currency != currency:
        return "currency_changed"
    return None


def _unavailable(
    cart: CartForCheckout, variants: Mapping[uuid.UUID, VariantForSale], inactive: set[uuid.UUID]
) -> list[dict[str, str]]:
    found = []
    for line in cart.lines:
        reason = _unavailable_reason(variants.get(line.variant_id), cart.currency, inactive)
        if reason is not None:
            found.append({"variant_id": str(line.variant_id), "reason": reason})
    return found


def _shortages(
    cart: CartForCheckout, variants: Mapping[uuid.UUID, VariantForSale]
) -> list[Shortage]:
    """The cart's lines that ask for more units than are available now."""
    wanted: dict[uuid.UUID, int] = {}
    for line in cart.lines:
        wanted[line.variant_id] = wanted.get(line.variant_id, 0) + line.quantity
    return [
        Shortage(variant_id=variant_id, requested=quantity, available=available)
        for variant_id, quantity in wanted.items()
        if (available := variants[variant_id].available) is not None and available < quantity
    ]


def _refuse_unavailable(unavailable: list[dict[str, str]]) -> CheckoutItemsUnavailable:
    return CheckoutItemsUnavailable(
        f"{len(unavailable)} item{'s' if len(unavailable) != 1 else ''} in the cart cannot "
        "be bought now; remove them and check out again.",
        unavailable=unavailable,
    )


async def place_checkout(
    session: AsyncSession,
    runtime: Runtime,
    buyer_id: uuid.UUID,
    request: CheckoutRequest,
    answering: Answering,
) -> PlacedCheckout:
    """Turn ``buyer_id``'s open cart into a checkout group with one order per seller,
    publish ``order.placed`` for each and close the cart. On PostgreSQL the stock is
    held first, committed on its own, and given back if ``session``'s transaction does
    not commit (the session must be a request's or :meth:`Runtime.transaction`'s, which
    run :func:`~soko.platform.runtime.on_rollback`). Elsewhere it is not held yet: call
    :func:`hold_stock` last, right before the transaction commits.

    The cart and its variants are read before the transaction writes anything, on a
    connection of their own (autocommit on PostgreSQL): a checkout refused there (an
    empty cart, an item no longer for sale, sold out) opens no transaction at all. The
    writes check what those reads decided: the cart is closed only at the version read,
    each store must still be active for the group to be created, and the hold takes
    only the stock there is. A price change or an expected total that differs is
    refused before anything is held.

    On PostgreSQL the writes and ``answering``'s answer, stored on the request's
    idempotency claim, are one autocommitted statement with no transaction around it
    (``placed.response`` is then the answer to send; see :func:`_write_in_one`). On
    SQLite the caller stores the answer in ``session``'s transaction."""
    previous = answering.claim.previous_token
    if previous is not None and holds_apart(runtime):
        # This request took the claim over from an attempt that died (or ran past its
        # lease): what that attempt held, it can no longer place. Given back before the
        # stock is read, so this attempt is not refused for its own earlier hold.
        await _GiveBackUnlessPlaced(runtime, previous, reason="checkout attempt abandoned")()
    async with runtime.db.reading() as reader:
        cart = await cart_for_checkout(reader, cart_id=request.cart_id, user_id=buyer_id)
        if not cart.lines:
            raise CheckoutCartEmpty("The cart has no items to check out.")
        now = runtime.clock.now()
        variants = await variants_for_sale(
            reader, [line.variant_id for line in cart.lines], stock_at=now
        )
        unavailable = _unavailable(cart, variants, set())
        if unavailable:
            # Name the lines of stores that stopped selling too, in the same answer.
            sellers = {v.seller_id for v in variants.values()}
            inactive = await inactive_seller_ids(reader, sellers)
            raise _refuse_unavailable(_unavailable(cart, variants, inactive))
    shortages = _shortages(cart, variants)
    if shortages:
        # Sold out already: answered before writing anything or waiting on a stock row
        # another checkout holds. When the read says there is enough, the reservation
        # at the end still decides, under its row locks.
        raise OutOfStock(shortages)

    group = CheckoutGroup(
        # The claim's token (a uuid7 of its own): the stock this attempt holds is held
        # under it, so a retry that takes the claim over from a dead attempt finds what
        # that attempt held (the first step of place_checkout).
        id=answering.claim.token or uuid7(),
        buyer_id=buyer_id,
        cart_id=cart.cart_id,
        status=GroupStatus.pending_payment.value,
        currency=cart.currency,
        total_minor=0,
        reservation_expires_at=now
        + dt.timedelta(seconds=runtime.settings.reservation_hold_seconds),
        shipping_address=dict(request.shipping_address) if request.shipping_address else None,
        created_at=now,
        paid_at=None,
        updated_at=now,
        version=1,
    )
    orders: dict[uuid.UUID, Order] = {}  # by seller, in the cart's order
    lines: dict[uuid.UUID, list[OrderLine]] = {}
    changed_prices = []
    for cart_line in cart.lines:
        variant = variants[cart_line.variant_id]
        if variant.price_minor != cart_line.unit_price_minor:
            changed_prices.append(
                {
                    "variant_id": str(variant.variant_id),
                    "price_when_added": cart_line.unit_price_minor,
                    "price_now": variant.price_minor,
                }
            )
        order = orders.get(variant.seller_id)
        if order is None:
            order = orders[variant.seller_id] = Order(
                id=uuid7(),
                group_id=group.id,
                seller_id=variant.seller_id,
                buyer_id=buyer_id,
                number=order_number(),
                status=INITIAL_STATE.value,
                currency=cart.currency,
                subtotal_minor=0,
                item_count=0,
                placed_at=now,
                updated_at=now,
                version=1,
            )
            lines[order.id] = []
        # The buyer pays today's price: a changed one is refused below unless accepted.
        line_total = variant.price_minor * cart_line.quantity
        lines[order.id].append(
            OrderLine(
                id=uuid7(),
                order_id=order.id,
                variant_id=variant.variant_id,
                product_id=variant.product_id,
                title=variant.title,
                sku=variant.sku,
                options=dict(variant.options),
                unit_price_minor=variant.price_minor,
                quantity=cart_line.quantity,
                line_total_minor=line_total,
                position=len(lines[order.id]),
            )
        )
        order.subtotal_minor += line_total
        order.item_count += cart_line.quantity
    group.total_minor = sum(order.subtotal_minor for order in orders.values())
    if group.total_minor > MAX_AMOUNT_MINOR:
        # Every line and subtotal is at most the total: stored and paid as 64-bit
        # integers, with room left for the sums the ledger makes of them.
        raise CheckoutTotalTooLarge(
            f"The cart adds up to {group.total_minor} {group.currency} minor units, more "
            f"than one checkout can take ({MAX_AMOUNT_MINOR}): check out fewer items.",
            total_minor=group.total_minor,
            max_total_minor=MAX_AMOUNT_MINOR,
            currency=group.currency,
        )

    if changed_prices and not request.accept_price_changes:
        raise CartPricesChanged(
            "Prices changed since these items were added to the cart: check out again "
            "with accept_price_changes to pay the prices of now.",
            lines=changed_prices,
        )
    if (
        request.expected_total_minor is not None
        and request.expected_total_minor != group.total_minor
    ):
        raise CheckoutTotalChanged(
            f"The checkout costs {group.total_minor}, not {request.expected_total_minor} "
            f"({group.currency} minor units).",
            total_minor=group.total_minor,
            expected_total_minor=request.expected_total_minor,
            currency=group.currency,
        )

    placed = PlacedCheckout(group=group, orders=list(orders.values()), lines=lines)
    if holds_apart(runtime):
        # Held before anything is written, in a transaction of its own, so the stock rows
        # are locked only while the hold is written; given back if this transaction does
        # not commit (and in any case once the hold runs out). The undo is registered
        # first: a hold whose answer never came back (a cancelled request) is covered too,
        # and giving back a hold that was never made gives back nothing.
        give_back = _GiveBackUnlessPlaced(runtime, group.id)
        on_rollback(session, give_back)
        try:
            await reserve_committed(
                runtime,
                holder_ref=group.id,
                lines=placed.reservation_lines(),
                expires_at=group.reservation_expires_at,
            )
        except OutOfStock:
            give_back.needed = False  # all or nothing: a refused hold holds nothing
            raise
        placed.held = True

    # One order.placed a store, written with the orders.
    events = event_rows(
        session,
        ORDER_PLACED,
        [
            OrderPlaced(
                order_id=order.id,
                group_id=group.id,
                number=order.number,
                buyer_id=buyer_id,
                seller_id=order.seller_id,
                currency=order.currency,
                subtotal_minor=order.subtotal_minor,
                item_count=order.item_count,
                placed_at=now,
            )
            for order in orders.values()
        ],
        now=now,
    )
    if runtime.db.dialect == "postgresql":
        if not await _write_in_one(session, runtime, placed, cart, events, answering):
            inactive = await inactive_seller_ids(session, orders)
            if inactive:
                raise _refuse_unavailable(_unavailable(cart, variants, inactive))
            await _refuse_unverified_buyer(session, runtime, buyer_id)
            raise CartChanged("The cart changed since it was read; read it again and retry.")
        return placed
    if not await _create_group(session, runtime, group, list(orders)):
        inactive = await inactive_seller_ids(session, orders)
        if not inactive:
            await _refuse_unverified_buyer(session, runtime, buyer_id)
        raise _refuse_unavailable(_unavailable(cart, variants, inactive))
    # One INSERT per table, whatever the number of orders and lines: plain Core
    # statements built once, not the session's unit of work (which spent more CPU on
    # its bookkeeping than the database on the rows).
    await session.execute(_insert_statement(Order), _rows_of(Order, orders.values()))
    await session.execute(_insert_statement(OrderLine), _rows_of(OrderLine, placed.all_lines()))
    await write_event_rows(session, events)
    await mark_converted(session, cart_id=cart.cart_id, version=cart.version)
    return placed


def holds_apart(runtime: Runtime) -> bool:
    """Whether a checkout holds its stock in a transaction of its own, before its
    writes (PostgreSQL), rather than last in its own transaction (SQLite). On PostgreSQL
    the stock row of a popular item is locked from the hold's UPDATE to its commit; in
    the checkout's transaction that spans the round trips to COMMIT, each waiting its
    turn in a busy event loop, while every other buyer of the item waits. On SQLite the
    one write lock is held from BEGIN IMMEDIATE to COMMIT whatever the order, so a
    transaction apart would only add one."""
    return runtime.db.dialect == "postgresql"


@dataclass(slots=True)
class _GiveBackUnlessPlaced:
    """The checkout's transaction did not commit: give back the stock held for it,
    unless the group exists after all (a COMMIT whose answer was lost).

    Also run by a retry that took the idempotency claim over from an attempt that died
    (or ran past its lease) after holding stock: that attempt can no longer write its
    group (its writes need the claim it lost), so what it held would otherwise stay held
    until the hold ran out, and the retry could find its own stock taken."""

    runtime: Runtime
    group_id: uuid.UUID
    needed: bool = True
    reason: str = "checkout not placed"

    async def __call__(self) -> None:
        if not self.needed:
            return
        async with self.runtime.transaction() as session:
            placed = await session.scalar(
                select(CheckoutGroup.id).where(CheckoutGroup.id == self.group_id)
            )
            if placed is not None:
                return
            released = await release_hold(session, self.runtime, self.group_id, reason=self.reason)
        if released:
            log.info(
                "checkout_hold_given_back",
                group_id=str(self.group_id),
                units=released,
                reason=self.reason,
            )


@lru_cache(maxsize=2)
def _insert_statement(model: type[Order] | type[OrderLine]) -> Any:
    table: Any = model.__table__
    return insert(table)


def _rows_of(model: type[Order] | type[OrderLine], objects: Iterable[Any]) -> list[dict[str, Any]]:
    """Every column of each (unsaved) object, for :func:`_insert_statement`: an unset
    one is None, as the models' defaults are."""
    names = [column.key for column in model.__table__.columns]
    return [{name: getattr(item, name) for name in names} for item in objects]


def _buyer_may_check_out() -> Any:
    """The condition a checkout's writes carry about its buyer (bind parameters
    ``buyer_id`` and ``any_buyer``): an account with a verified email or phone, unless
    ``SOKO_CHECKOUT_REQUIRES_VERIFIED_CONTACT`` is off."""
    return or_(
        bindparam("any_buyer", type_=Boolean()),
        reachable_user(bindparam("buyer_id", type_=Uuid())),
    )


async def _refuse_unverified_buyer(
    session: AsyncSession, runtime: Runtime, buyer_id: uuid.UUID
) -> None:
    """After writes that did not happen: raise :class:`CheckoutNeedsVerifiedContact`
    when the buyer's contact is why; return otherwise (the caller names the cause)."""
    if runtime.settings.checkout_requires_verified_contact and not await is_reachable(
        session, buyer_id
    ):
        raise CheckoutNeedsVerifiedContact(
            "Verify your email address or phone number first: a checkout holds stock, so "
            "only verified accounts may place one. Then check out with a new "
            "Idempotency-Key."
        )


@lru_cache(maxsize=1)
def _create_group_statement() -> Any:
    """``INSERT INTO orders_checkout_groups ... SELECT <the group's values> WHERE <every
    seller is active>``, built once: a bind parameter per column (``v_<name>``), the
    sellers (``sellers``, expanding) and how many there are (``seller_count``)."""
    table: Any = CheckoutGroup.__table__
    active = active_seller_ids().subquery()
    selling = (
        select(func.count())
        .select_from(active)
        .where(active.c.id.in_(bindparam("sellers", expanding=True)))
        .scalar_subquery()
    )
    names = [column.name for column in table.columns]
    values = select(
        *(bindparam(f"v_{name}", type_=table.c[name].type).label(name) for name in names)
    ).where(selling == bindparam("seller_count"), _buyer_may_check_out())
    # The table, not the mapped class: executed with parameters, an ORM insert would be
    # taken for a bulk insert of those parameters.
    return insert(table).from_select(names, values).returning(table.c.id)


async def _create_group(
    session: AsyncSession,
    runtime: Runtime,
    group: CheckoutGroup,
    sellers: Sequence[uuid.UUID],
) -> bool:
    """Insert the group only if every seller of the checkout may sell and the buyer may
    check out; whether it was. The sellers' published "active stores" read model and
    the buyer's verified contact are checked inside the INSERT, so the checks cost no
    statement of their own (ADR 0006)."""
    parameters: dict[str, Any] = {
        f"v_{column.name}": getattr(group, column.name)
        for column in CheckoutGroup.__table__.columns
    }
    parameters.update(
        sellers=list(sellers),
        seller_count=len(sellers),
        buyer_id=group.buyer_id,
        any_buyer=not runtime.settings.checkout_requires_verified_contact,
    )
    created = await session.execute(_create_group_statement(), parameters)
    return created.first() is not None


# Parameter prefixes of the one-statement checkout: one per table it writes.
_GROUP, _ORDERS, _LINES, _EVENTS = "g_", "o_", "l_", "e_"


@dataclass(frozen=True, slots=True)
class Answering:
    """The request's idempotency claim, and how the answer is made of what was placed
    (its body, status and headers), for a checkout that stores its answer with its
    writes."""

    claim: IdempotentRequest
    answer: Callable[[PlacedCheckout], tuple[Any, int, dict[str, str]]]


@lru_cache(maxsize=1)
def _write_in_one_statement() -> Any:
    """PostgreSQL: the checkout's writes and its answer as one statement, built once.

    The idempotency claim is locked first (if it is still this request's), then the cart
    closed at the version read, only if every store of the checkout may still sell and
    the claim is held; the group, its orders, their lines, the ``order.placed`` events
    and the answer on the claim are written only if the cart was closed. So the
    statement, autocommitted, writes all or nothing. It answers how many carts it
    closed, answers it stored and claims it held."""
    groups: Any = CheckoutGroup.__table__
    active = active_seller_ids().subquery()
    selling = (
        select(func.count())
        .select_from(active)
        .where(active.c.id == any_(bindparam("sellers", type_=ARRAY(Uuid()))))
        .scalar_subquery()
    )
    held = held_claim_statement().cte("claim_held")
    may_close = and_(
        selling == bindparam("seller_count"), exists(select(held.c.id)), _buyer_may_check_out()
    )
    closed = converting_statement().where(may_close).cte("closed")
    placed = exists(select(closed.c.id))
    names = [column.name for column in groups.columns]
    group_values = select(
        *(bindparam(_GROUP + name, type_=groups.c[name].type).label(name) for name in names)
    ).where(placed)
    order_table: Any = Order.__table__
    line_table: Any = OrderLine.__table__
    answered = answering_statement().where(placed).cte("answered")
    writes = (
        insert(groups).from_select(names, group_values).cte("group_written"),
        unnest_insert(order_table, _ORDERS, where=placed).cte("orders_written"),
        unnest_insert(line_table, _LINES, where=placed).cte("lines_written"),
        publishing_insert(_EVENTS, where=placed).cte("events_written"),
        answered,
    )
    counts = (
        select(func.count()).select_from(table).scalar_subquery()
        for table in (closed, answered, held)
    )
    return select(*counts).add_cte(*writes)


async def _write_in_one(
    session: AsyncSession,
    runtime: Runtime,
    placed: PlacedCheckout,
    cart: CartForCheckout,
    events: list[dict[str, Any]],
    answering: Answering,
) -> bool:
    """Write the checkout and store its answer in one round trip, autocommitted
    (PostgreSQL): no BEGIN, no COMMIT and no UPDATE of its own for the answer, where a
    transaction took eight round trips. False, with nothing written, when a store stopped
    selling or the cart moved since it was read; raises
    :meth:`IdempotentRequest.taken_over`, with nothing written, when the claim is no
    longer this request's."""
    group = placed.group
    sellers = [order.seller_id for order in placed.orders]
    parameters: dict[str, Any] = {
        _GROUP + column.name: getattr(group, column.key)
        for column in CheckoutGroup.__table__.columns
    }
    parameters.update(
        sellers=sellers,
        seller_count=len(sellers),
        buyer_id=group.buyer_id,
        any_buyer=not runtime.settings.checkout_requires_verified_contact,
        cart_id=cart.cart_id,
        read_version=cart.version,
        now=session_now(session),
    )
    order_table: Any = Order.__table__
    line_table: Any = OrderLine.__table__
    parameters.update(unnest_parameters(order_table, _ORDERS, _rows_of(Order, placed.orders)))
    parameters.update(
        unnest_parameters(line_table, _LINES, _rows_of(OrderLine, placed.all_lines()))
    )
    parameters.update(publishing_parameters(_EVENTS, events))
    body, status_code, headers = answering.answer(placed)
    stored, answer_parameters = answering.claim.answer_parameters(
        body, status_code=status_code, headers=headers
    )
    parameters.update(answer_parameters)
    async with runtime.db.writing_once() as connection:
        closed, answered, held = (
            await connection.execute(_write_in_one_statement(), parameters)
        ).one()
    if not held:
        raise answering.claim.taken_over()
    if not closed:
        return False
    if not answered:  # the claim was locked and ours: cannot happen
        raise RuntimeError("the checkout was written but its answer was not stored")
    placed.response = answering.claim.answered_with(stored)
    return True


async def hold_stock(session: AsyncSession, runtime: Runtime, placed: PlacedCheckout) -> None:
    """Hold the checkout's stock until the group's ``reservation_expires_at``, all or
    nothing (raises ``out-of-stock``), unless :func:`place_checkout` held it already
    (see :func:`holds_apart`). The contended step: call it last."""
    if placed.held:
        return
    await reserve(
        session,
        runtime,
        holder_ref=placed.group.id,
        lines=placed.reservation_lines(),
        expires_at=placed.group.reservation_expires_at,
    )
