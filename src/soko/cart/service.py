"""The rules of carts: who may use one, lines that never lose a concurrent change, the
view with today's prices and stock, the merge that follows a sign-in, and expiry.

Every write to a cart starts with one conditional UPDATE of the cart row that checks
access, status and (from ``If-Match``) version, and bumps the version. That statement
also takes the row's lock (on SQLite the write transaction is already exclusive), so
line changes of one cart happen one transaction at a time, and each is an atomic
statement of its own: an upsert that adds to the quantity, or an UPDATE that sets it.
Nothing is read and then written back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog
from sqlalchemy import ColumnElement, and_, delete, false, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.cart.errors import CartClosed, CartFull, CartNotFound
from soko.cart.models import MAX_CART_LINES, MAX_LINE_QUANTITY, Cart, CartLine, CartStatus
from soko.catalog.public import VariantForSale, variants_for_sale
from soko.inventory.public import available_for
from soko.platform.db import dialect_insert
from soko.platform.errors import NotFound, PreconditionFailed, ValidationFailed
from soko.platform.etag import etag_for_version, parse_etag_list
from soko.platform.ids import uuid7
from soko.platform.money import Money, UnknownCurrencyError, minor_units
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.cart")

CART_TOKEN_PREFIX = "ct_"
CART_TOKEN_HEADER = "x-cart-token"

# Spelled as SQL text, not a bound parameter: PostgreSQL matches an ON CONFLICT target
# to the partial unique index only when it can prove the predicate, which it cannot
# do for a parameter.
_OPEN_PREDICATE = text("status = 'open'")


# -- tokens and access ---------------------------------------------------------------------------


def new_cart_token() -> str:
    """A fresh anonymous cart secret: ``ct_`` and 32 random bytes, URL-safe."""
    return CART_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_cart_token(token: str) -> str:
    """What is stored of a cart token. A plain SHA-256 is enough: the token is 256 random
    bits, so there is nothing to guess from its hash."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CartAccess:
    """Who is asking for a cart: the signed-in user, and the hash of the cart token the
    request carried. A user's cart answers to the user only; an anonymous cart to its
    token, whoever sends it."""

    user_id: uuid.UUID | None = None
    token_hash: str | None = None

    @classmethod
    def of(cls, user_id: uuid.UUID | None, token: str | None) -> CartAccess:
        if token is None or not token.startswith(CART_TOKEN_PREFIX):
            return cls(user_id=user_id)
        return cls(user_id=user_id, token_hash=hash_cart_token(token))

    def where(self) -> ColumnElement[bool]:
        """The SQL condition for a cart this caller may use. Comparing hashes in SQL leaks
        nothing worth timing: a near miss tells about the hash of the caller's own
        guess, never about the token behind the stored one."""
        allowed: list[ColumnElement[bool]] = []
        if self.user_id is not None:
            allowed.append(Cart.user_id == self.user_id)
        if self.token_hash is not None:
            allowed.append(and_(Cart.user_id.is_(None), Cart.token_hash == self.token_hash))
        return or_(*allowed) if allowed else false()

    def allows(self, cart: Cart) -> bool:
        if cart.user_id is not None:
            return cart.user_id == self.user_id
        return (
            self.token_hash is not None
            and cart.token_hash is not None
            and hmac.compare_digest(cart.token_hash, self.token_hash)
        )


# A cart's version is a 32-bit column: a tag naming more cannot be current.
MAX_VERSION = 2**31 - 1


def versions_named(if_match: str | None) -> frozenset[int] | None:
    """The cart versions an ``If-Match`` header accepts; ``None`` when it sets no
    condition (absent, or ``*``: any current cart). Weak tags never match a write.

    A tag is ``"v7"``, or ``"v7.<digest>"`` as a full read of the cart answers (the
    digest tells a client's copy from today's prices; a write goes by the version). A
    version no cart can have matches nothing (412), whatever its digits."""
    if if_match is None:
        return None
    listed = parse_etag_list(if_match)
    if listed == "*":
        return None
    versions: set[int] = set()
    for tag in listed:
        digits = tag.opaque[1:].partition(".")[0]
        if (
            not tag.weak
            and tag.opaque.startswith("v")
            and digits.isdecimal()
            and len(digits) <= 10
            and int(digits) <= MAX_VERSION
        ):
            versions.add(int(digits))
    return frozenset(versions)


# -- creating carts ---------------------------------------------------------------------------


def _currency(runtime: Runtime, requested: str | None) -> str:
    currency = requested or runtime.settings.default_currency
    try:
        minor_units(currency)
    except UnknownCurrencyError:
        raise ValidationFailed.of_field("currency", "is not a currency Soko knows") from None
    return currency


async def create_anonymous_cart(
    session: AsyncSession, runtime: Runtime, *, currency: str | None = None
) -> tuple[Cart, str]:
    """A new anonymous cart and its token (the only time the token is seen)."""
    now = runtime.clock.now()
    token = new_cart_token()
    cart = Cart(
        id=uuid7(),
        token_hash=hash_cart_token(token),
        status=CartStatus.open.value,
        currency=_currency(runtime, currency),
        version=1,
        created_at=now,
        updated_at=now,
    )
    session.add(cart)
    await session.flush()
    return cart, token


async def open_cart_of_user(
    session: AsyncSession, runtime: Runtime, user_id: uuid.UUID, *, currency: str | None = None
) -> tuple[Cart, bool]:
    """The user's open cart, created if they have none; and whether it was created.

    Insert-or-nothing against the one-open-cart-per-user index, then read: two requests
    racing both end with the same cart."""
    now = runtime.clock.now()
    insert = dialect_insert(session)
    created = (
        await session.execute(
            insert(Cart)
            .values(
                id=uuid7(),
                user_id=user_id,
                status=CartStatus.open.value,
                currency=_currency(runtime, currency),
                version=1,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=[Cart.user_id], index_where=_OPEN_PREDICATE)
            .returning(Cart.id)
        )
    ).first()
    cart = (
        await session.scalars(
            select(Cart)
            .where(Cart.user_id == user_id, Cart.status == CartStatus.open.value)
            .execution_options(populate_existing=True)
        )
    ).one()
    return cart, created is not None


# -- writing lines ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LineState:
    variant_id: uuid.UUID
    quantity: int
    unit_price_minor: int
    currency: str
    added_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class LineWrite:
    """A line change done: the cart's new version and the line (None once removed)."""

    cart_id: uuid.UUID
    version: int
    line: LineState | None


_LINE_COLUMNS = (
    CartLine.variant_id,
    CartLine.quantity,
    CartLine.unit_price_minor,
    CartLine.currency,
    CartLine.added_at,
    CartLine.updated_at,
)


async def _begin_change(
    session: AsyncSession,
    now: dt.datetime,
    cart_id: uuid.UUID,
    access: CartAccess,
    versions: frozenset[int] | None,
) -> tuple[int, str]:
    """Bump the version of an open cart the caller may use, at a version ``If-Match``
    accepts; return the new version and the cart's currency. The one statement that
    checks access, state and version, and locks the cart for the rest of the change."""
    statement = update(Cart).where(
        Cart.id == cart_id, Cart.status == CartStatus.open.value, access.where()
    )
    if versions is not None:
        statement = statement.where(Cart.version.in_(versions))
    row = (
        await session.execute(
            statement.values(version=Cart.version + 1, updated_at=now)
            .returning(Cart.version, Cart.currency)
            .execution_options(synchronize_session=False)
        )
    ).first()
    if row is None:
        await _refuse_change(session, cart_id, access)
    assert row is not None  # _refuse_change always raises
    return row[0], row[1]


async def _refuse_change(session: AsyncSession, cart_id: uuid.UUID, access: CartAccess) -> None:
    """Say why a change matched no cart: not the caller's (404), closed (409) or at
    another version than If-Match named (412). Only ever on the refusal path."""
    row = (
        await session.execute(
            select(Cart.status, Cart.version, Cart.merged_into).where(
                Cart.id == cart_id, access.where()
            )
        )
    ).first()
    if row is None:
        raise CartNotFound()
    status, version, merged_into = row
    if status != CartStatus.open.value:
        raise CartClosed(
            f"This cart is {status} and takes no more changes.",
            cart_status=status,
            merged_into=str(merged_into) if merged_into else None,
        )
    raise PreconditionFailed(
        "The cart has changed since you read it: fetch it again and retry.",
        current_etag=etag_for_version(version),
    )


def _for_sale(variant: VariantForSale | None) -> VariantForSale:
    if variant is None or not variant.purchasable:
        raise ValidationFailed.of_field("variant_id", "is not a variant on sale")
    return variant


async def add_line(
    session: AsyncSession,
    runtime: Runtime,
    *,
    cart_id: uuid.UUID,
    access: CartAccess,
    variant_id: uuid.UUID,
    quantity: int,
    versions: frozenset[int] | None = None,
) -> LineWrite:
    """Add ``quantity`` of a variant: a new line, or more of the line already there (at
    the price of now, which the buyer just saw). Three statements, whatever the cart
    holds: the variant, the cart's version bump, and one upsert; a new line adds a
    fourth, which counts the cart's lines (at most :data:`MAX_CART_LINES`)."""
    variant = _for_sale((await variants_for_sale(session, [variant_id])).get(variant_id))
    now = runtime.clock.now()
    version, currency = await _begin_change(session, now, cart_id, access, versions)
    if variant.currency != currency:
        raise ValidationFailed.of_field(
            "variant_id", f"is priced in {variant.currency}; this cart is in {currency}"
        )
    insert = dialect_insert(session)
    statement = insert(CartLine).values(
        id=uuid7(),
        cart_id=cart_id,
        variant_id=variant_id,
        quantity=quantity,
        unit_price_minor=variant.price_minor,
        currency=variant.currency,
        added_at=now,
        updated_at=now,
    )
    # Added in the database, so two buyers' tabs adding at once both count; the WHERE
    # keeps the sum in range instead of tripping the CHECK constraint.
    statement = statement.on_conflict_do_update(
        index_elements=[CartLine.cart_id, CartLine.variant_id],
        set_={
            "quantity": CartLine.quantity + statement.excluded.quantity,
            "unit_price_minor": statement.excluded.unit_price_minor,
            "updated_at": statement.excluded.updated_at,
        },
        where=CartLine.quantity + statement.excluded.quantity <= MAX_LINE_QUANTITY,
    ).returning(*_LINE_COLUMNS)
    row = (await session.execute(statement)).first()
    if row is None:
        raise ValidationFailed.of_field(
            "quantity", f"would take the line above {MAX_LINE_QUANTITY}"
        )
    line = LineState(*row)
    if line.added_at == now:
        # A new line (one already there keeps its first time): counted under the cart
        # row's lock that _begin_change took, so concurrent adds cannot both slip in.
        lines = await session.scalar(
            select(func.count()).select_from(CartLine).where(CartLine.cart_id == cart_id)
        )
        if (lines or 0) > MAX_CART_LINES:
            raise CartFull(
                f"A cart holds at most {MAX_CART_LINES} different items.",
                max_lines=MAX_CART_LINES,
            )
    return LineWrite(cart_id=cart_id, version=version, line=line)


async def set_line_quantity(
    session: AsyncSession,
    runtime: Runtime,
    *,
    cart_id: uuid.UUID,
    access: CartAccess,
    variant_id: uuid.UUID,
    quantity: int,
    versions: frozenset[int] | None = None,
) -> LineWrite:
    """Set a line's quantity; 0 removes the line. The price when added is kept, so a
    price change stays flagged until the buyer adds the variant again."""
    if quantity == 0:
        return await remove_line(
            session,
            runtime,
            cart_id=cart_id,
            access=access,
            variant_id=variant_id,
            versions=versions,
        )
    now = runtime.clock.now()
    version, _ = await _begin_change(session, now, cart_id, access, versions)
    row = (
        await session.execute(
            update(CartLine)
            .where(CartLine.cart_id == cart_id, CartLine.variant_id == variant_id)
            .values(quantity=quantity, updated_at=now)
            .returning(*_LINE_COLUMNS)
            .execution_options(synchronize_session=False)
        )
    ).first()
    if row is None:
        raise NotFound("This cart has no line for that variant.")
    return LineWrite(cart_id=cart_id, version=version, line=LineState(*row))


async def remove_line(
    session: AsyncSession,
    runtime: Runtime,
    *,
    cart_id: uuid.UUID,
    access: CartAccess,
    variant_id: uuid.UUID,
    versions: frozenset[int] | None = None,
) -> LineWrite:
    now = runtime.clock.now()
    version, _ = await _begin_change(session, now, cart_id, access, versions)
    removed = (
        await session.execute(
            delete(CartLine)
            .where(CartLine.cart_id == cart_id, CartLine.variant_id == variant_id)
            .returning(CartLine.id)
            .execution_options(synchronize_session=False)
        )
    ).first()
    if removed is None:
        raise NotFound("This cart has no line for that variant.")
    return LineWrite(cart_id=cart_id, version=version, line=None)


# -- the cart as the buyer sees it --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ViewLine:
    variant_id: uuid.UUID
    product_id: uuid.UUID | None
    seller_id: uuid.UUID | None
    title: str
    sku: str
    options: dict[str, str]
    image: str | None
    quantity: int
    unit_price: Money
    price_when_added: Money
    compare_at: Money | None
    available: int
    purchasable: bool
    added_at: dt.datetime

    @property
    def price_changed(self) -> bool:
        return self.unit_price != self.price_when_added

    @property
    def line_total(self) -> Money:
        return self.unit_price * self.quantity

    @property
    def quantity_available_ok(self) -> bool:
        return self.quantity <= self.available


@dataclass(frozen=True, slots=True)
class SellerSubtotal:
    seller_id: uuid.UUID
    subtotal: Money
    item_count: int


@dataclass(frozen=True, slots=True)
class CartView:
    id: uuid.UUID
    status: str
    currency: str
    version: int
    signed_in: bool
    merged_into: uuid.UUID | None
    lines: tuple[ViewLine, ...]
    created_at: dt.datetime
    updated_at: dt.datetime

    def _payable(self) -> list[ViewLine]:
        # What a checkout would charge: lines that can be bought, at today's price.
        return [
            line
            for line in self.lines
            if line.purchasable
            and line.seller_id is not None
            and line.unit_price.currency == self.currency
        ]

    @property
    def sellers(self) -> tuple[SellerSubtotal, ...]:
        by_seller: dict[uuid.UUID, list[ViewLine]] = {}
        for line in self._payable():
            assert line.seller_id is not None
            by_seller.setdefault(line.seller_id, []).append(line)
        return tuple(
            SellerSubtotal(
                seller_id=seller_id,
                subtotal=Money.total((line.line_total for line in lines), self.currency),
                item_count=sum(line.quantity for line in lines),
            )
            for seller_id, lines in by_seller.items()
        )

    @property
    def total(self) -> Money:
        return Money.total((line.line_total for line in self._payable()), self.currency)

    @property
    def item_count(self) -> int:
        return sum(line.quantity for line in self.lines)


async def find_cart(session: AsyncSession, *, cart_id: uuid.UUID, access: CartAccess) -> Cart:
    """The cart ``cart_id`` if the caller may see it (any status); 404 otherwise."""
    cart = await session.get(Cart, cart_id, populate_existing=True)
    if cart is None or not access.allows(cart):
        raise CartNotFound()
    return cart


async def read_cart(
    session: AsyncSession, runtime: Runtime, *, cart_id: uuid.UUID, access: CartAccess
) -> CartView:
    """The cart with current prices, availability and per-seller subtotals; 404 when the
    caller may not see it. Four statements, whatever the cart holds."""
    return await cart_view(
        session, runtime, await find_cart(session, cart_id=cart_id, access=access)
    )


async def cart_view(session: AsyncSession, runtime: Runtime, cart: Cart) -> CartView:
    """``cart`` with its lines as the catalog and inventory see them now."""
    lines = (
        await session.execute(
            select(*_LINE_COLUMNS)
            .where(CartLine.cart_id == cart.id)
            .order_by(CartLine.added_at, CartLine.id)
        )
    ).all()
    ids = [line.variant_id for line in lines]
    # The variants and their stock in one statement (catalog's read carries inventory's).
    variants = await variants_for_sale(session, ids, stock_at=runtime.clock.now()) if ids else {}
    return CartView(
        id=cart.id,
        status=cart.status,
        currency=cart.currency,
        version=cart.version,
        signed_in=cart.user_id is not None,
        merged_into=cart.merged_into,
        lines=tuple(_view_line(LineState(*line), variants.get(line.variant_id)) for line in lines),
        created_at=cart.created_at,
        updated_at=cart.updated_at,
    )


def _view_line(line: LineState, variant: VariantForSale | None) -> ViewLine:
    when_added = Money(line.unit_price_minor, line.currency)
    if variant is None:
        # Gone from the catalog: shown so the buyer sees what happened, never charged.
        return ViewLine(
            variant_id=line.variant_id,
            product_id=None,
            seller_id=None,
            title="",
            sku="",
            options={},
            image=None,
            quantity=line.quantity,
            unit_price=when_added,
            price_when_added=when_added,
            compare_at=None,
            available=0,
            purchasable=False,
            added_at=line.added_at,
        )
    return ViewLine(
        variant_id=line.variant_id,
        product_id=variant.product_id,
        seller_id=variant.seller_id,
        title=variant.title,
        sku=variant.sku,
        options=dict(variant.options),
        image=variant.image,
        quantity=line.quantity,
        unit_price=Money(variant.price_minor, variant.currency),
        price_when_added=when_added,
        compare_at=(
            Money(variant.compare_at_minor, variant.currency)
            if variant.compare_at_minor is not None
            else None
        ),
        available=variant.available or 0,
        purchasable=variant.purchasable,
        added_at=line.added_at,
    )


# -- merge on sign-in ---------------------------------------------------------------------------


class AdjustmentReason(StrEnum):
    out_of_stock = "out_of_stock"
    line_limit = "line_limit"
    other_currency = "other_currency"
    cart_full = "cart_full"


@dataclass(frozen=True, slots=True)
class MergeAdjustment:
    """A line the merge could not carry over in full."""

    variant_id: uuid.UUID
    requested: int
    quantity: int
    reason: AdjustmentReason


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    cart_id: uuid.UUID  # the account's cart after the merge
    adopted: bool  # the anonymous cart itself became the account's cart
    adjustments: tuple[MergeAdjustment, ...]


async def merge_anonymous_cart(
    session: AsyncSession,
    runtime: Runtime,
    *,
    user_id: uuid.UUID,
    token_hash: str,
    cart_id: uuid.UUID | None = None,
) -> MergeOutcome | None:
    """Fold the open anonymous cart behind ``token_hash`` (and ``cart_id``, when given)
    into ``user_id``'s open cart; ``None`` when there is no such cart (unknown token,
    already merged or adopted: a repeat does nothing).

    Without an open cart of their own, the user simply adopts the anonymous one.
    Otherwise each variant's quantities are summed, capped at what is available now
    (never below what the user's cart already held), the anonymous cart becomes
    ``merged`` with ``merged_into`` set, and both carts' versions move on.

    Locks are taken in one order, the anonymous cart before the user's, so concurrent
    merges and line changes queue instead of deadlocking."""
    now = runtime.clock.now()
    query = (
        select(Cart.id, Cart.currency)
        .where(
            Cart.token_hash == token_hash,
            Cart.status == CartStatus.open.value,
            Cart.user_id.is_(None),
        )
        .with_for_update()
    )
    if cart_id is not None:
        query = query.where(Cart.id == cart_id)
    anonymous = (await session.execute(query)).first()
    if anonymous is None:
        return None
    anonymous_id = anonymous[0]

    target = await _lock_open_cart_of(session, user_id, now)
    if target is None:
        try:
            async with session.begin_nested():
                await session.execute(
                    update(Cart)
                    .where(Cart.id == anonymous_id)
                    .values(user_id=user_id, version=Cart.version + 1, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
        except IntegrityError:
            # The user's own cart appeared meanwhile (a sign-in on another device, or a
            # create): merge into it instead.
            target = await _lock_open_cart_of(session, user_id, now)
            if target is None:
                raise
        else:
            return MergeOutcome(cart_id=anonymous_id, adopted=True, adjustments=())
    target_id, target_currency = target

    rows = (
        await session.execute(
            select(CartLine.cart_id, *_LINE_COLUMNS).where(
                CartLine.cart_id.in_((anonymous_id, target_id))
            )
        )
    ).all()
    held = {row.variant_id: row.quantity for row in rows if row.cart_id == target_id}
    # Oldest first, so that when the user's cart has no room for them all, the lines
    # carried over are the ones the buyer chose first.
    incoming = sorted(
        (LineState(*row[1:]) for row in rows if row.cart_id == anonymous_id),
        key=lambda line: (line.added_at, line.variant_id),
    )
    stock = await available_for(session, runtime, [line.variant_id for line in incoming])

    merged_lines: list[dict[str, Any]] = []
    adjustments: list[MergeAdjustment] = []
    free_lines = MAX_CART_LINES - len(held)
    for line in incoming:
        already = held.get(line.variant_id, 0)
        requested = already + line.quantity
        if line.currency != target_currency:
            adjustments.append(
                MergeAdjustment(
                    line.variant_id, requested, already, AdjustmentReason.other_currency
                )
            )
            continue
        if line.variant_id not in held and free_lines <= 0:
            adjustments.append(
                MergeAdjustment(line.variant_id, requested, 0, AdjustmentReason.cart_full)
            )
            continue
        available = max(stock.get(line.variant_id, 0), 0)
        quantity = min(requested, max(available, already), MAX_LINE_QUANTITY)
        if quantity < requested:
            reason = (
                AdjustmentReason.line_limit
                if quantity == MAX_LINE_QUANTITY
                else AdjustmentReason.out_of_stock
            )
            adjustments.append(MergeAdjustment(line.variant_id, requested, quantity, reason))
        if quantity > already:
            if line.variant_id not in held:
                free_lines -= 1
            merged_lines.append(
                {
                    "id": uuid7(),
                    "cart_id": target_id,
                    "variant_id": line.variant_id,
                    "quantity": quantity,
                    "unit_price_minor": line.unit_price_minor,
                    "currency": line.currency,
                    "added_at": line.added_at,
                    "updated_at": now,
                }
            )
    if merged_lines:
        # The user's cart is locked (its version was bumped above), so the quantities
        # read a moment ago are still the current ones.
        insert = dialect_insert(session)
        statement = insert(CartLine).values(merged_lines)
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[CartLine.cart_id, CartLine.variant_id],
                set_={
                    "quantity": statement.excluded.quantity,
                    "updated_at": statement.excluded.updated_at,
                },
            )
        )
    await session.execute(
        update(Cart)
        .where(Cart.id == anonymous_id)
        .values(
            status=CartStatus.merged.value,
            merged_into=target_id,
            version=Cart.version + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return MergeOutcome(cart_id=target_id, adopted=False, adjustments=tuple(adjustments))


async def _lock_open_cart_of(
    session: AsyncSession, user_id: uuid.UUID, now: dt.datetime
) -> tuple[uuid.UUID, str] | None:
    """Bump (and so lock) the user's open cart; its id and currency, or None."""
    row = (
        await session.execute(
            update(Cart)
            .where(Cart.user_id == user_id, Cart.status == CartStatus.open.value)
            .values(version=Cart.version + 1, updated_at=now)
            .returning(Cart.id, Cart.currency)
            .execution_options(synchronize_session=False)
        )
    ).first()
    return (row[0], row[1]) if row is not None else None


async def merge_for_request(
    session: AsyncSession,
    runtime: Runtime,
    *,
    cart_id: uuid.UUID,
    user_id: uuid.UUID,
    token: str | None,
) -> tuple[CartView, MergeOutcome]:
    """The explicit merge: the anonymous cart ``cart_id`` (proved by its token) into the
    caller's cart. A repeat answers the cart it went into, without changing anything."""
    if token is None or not token.startswith(CART_TOKEN_PREFIX):
        raise CartNotFound("Send the anonymous cart's token in X-Cart-Token.")
    token_hash = hash_cart_token(token)
    outcome = await merge_anonymous_cart(
        session, runtime, user_id=user_id, token_hash=token_hash, cart_id=cart_id
    )
    if outcome is None:
        outcome = await _earlier_merge(
            session, cart_id=cart_id, user_id=user_id, token_hash=token_hash
        )
    view = await read_cart(
        session, runtime, cart_id=outcome.cart_id, access=CartAccess(user_id=user_id)
    )
    return view, outcome


async def _earlier_merge(
    session: AsyncSession, *, cart_id: uuid.UUID, user_id: uuid.UUID, token_hash: str
) -> MergeOutcome:
    cart = await session.get(Cart, cart_id, populate_existing=True)
    if (
        cart is None
        or cart.token_hash is None
        or not hmac.compare_digest(cart.token_hash, token_hash)
    ):
        raise CartNotFound()
    if cart.user_id == user_id:
        return MergeOutcome(cart_id=cart.id, adopted=True, adjustments=())
    if cart.status == CartStatus.merged.value and cart.merged_into is not None:
        into = await session.get(Cart, cart.merged_into)
        if into is not None and into.user_id == user_id:
            return MergeOutcome(cart_id=into.id, adopted=False, adjustments=())
    # Taken by another account, or closed before anyone signed in with it.
    raise CartNotFound()


# -- expiry ----------------------------------------------------------------------------------


EXPIRY_BATCH = 2_000


async def expire_abandoned_carts(
    session: AsyncSession,
    *,
    now: dt.datetime,
    older_than: dt.timedelta,
    limit: int = EXPIRY_BATCH,
) -> int:
    """Close up to ``limit`` open carts untouched since ``now - older_than``, the
    oldest first (read in the order of the (status, updated_at) index); the count
    closed. Bounded, so one run never holds SQLite's write lock (or many PostgreSQL row
    locks) for long: a full batch means more may wait."""
    conditions = (Cart.status == CartStatus.open.value, Cart.updated_at < now - older_than)
    oldest = select(Cart.id).where(*conditions).order_by(Cart.updated_at).limit(limit)
    result = await session.execute(
        update(Cart)
        # Checked again: a cart touched since it was picked stays open.
        .where(Cart.id.in_(oldest.scalar_subquery()), *conditions)
        .values(status=CartStatus.expired.value, version=Cart.version + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
