"""The request and response shapes of carts."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, ConfigDict, Field

from soko.cart.models import MAX_LINE_QUANTITY
from soko.platform.money import Money


class CartCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: str | None = Field(
        default=None,
        pattern=r"^[A-Z]{3}$",
        description="The cart's currency (ISO 4217); the marketplace's default when left out",
    )


class LineAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant_id: uuid.UUID
    quantity: int = Field(
        default=1,
        strict=True,
        ge=1,
        le=MAX_LINE_QUANTITY,
        description="Added to the line's quantity when the variant is already in the cart",
    )


class LineChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quantity: int = Field(
        strict=True, ge=0, le=MAX_LINE_QUANTITY, description="The new quantity; 0 removes"
    )


class CartLineOut(BaseModel):
    """One line with what the catalog and inventory say about it now."""

    variant_id: uuid.UUID
    product_id: uuid.UUID | None = Field(description="None when the variant no longer exists")
    seller_id: uuid.UUID | None
    title: str
    sku: str
    options: dict[str, str]
    image: str | None
    quantity: int
    unit_price: Money = Field(description="The price now; what a checkout would charge")
    price_when_added: Money = Field(description="The price when the buyer added the line")
    price_changed: bool = Field(description="Whether the price changed since then")
    compare_at: Money | None
    line_total: Money
    available: int = Field(description="How many can be bought now")
    quantity_available_ok: bool = Field(description="Whether the quantity is available now")
    purchasable: bool = Field(description="Whether the product is published and the variant active")
    added_at: dt.datetime


class SellerSubtotalOut(BaseModel):
    seller_id: uuid.UUID
    subtotal: Money
    item_count: int


class CartOut(BaseModel):
    """A cart as its holder sees it. Subtotals and the total count purchasable lines at
    their current price: what a checkout would charge."""

    id: uuid.UUID
    status: str
    currency: str
    version: int
    signed_in: bool = Field(description="Whether the cart belongs to an account (not a token)")
    merged_into: uuid.UUID | None
    lines: list[CartLineOut]
    sellers: list[SellerSubtotalOut]
    total: Money
    item_count: int = Field(
        description="Units of every line, those that cannot be bought included; the "
        "sellers' counts and the total take purchasable lines only"
    )
    created_at: dt.datetime
    updated_at: dt.datetime


class CartCreated(BaseModel):
    cart: CartOut
    token: str | None = Field(
        default=None,
        description=(
            "An anonymous cart's secret: send it as X-Cart-Token to use the cart. Shown "
            "only in this answer; never stored in clear."
        ),
    )


class LineOut(BaseModel):
    variant_id: uuid.UUID
    quantity: int
    price_when_added: Money
    added_at: dt.datetime
    updated_at: dt.datetime


class LineWritten(BaseModel):
    """The answer to a line change: the cart's new version (also its ETag) and the line
    as it now stands (``None`` once removed). Read the cart for prices and totals."""

    cart_id: uuid.UUID
    version: int
    line: LineOut | None


class MergeAdjustmentOut(BaseModel):
    variant_id: uuid.UUID
    requested: int = Field(description="The two carts' quantities summed")
    quantity: int = Field(description="What the line holds after the merge (0: left out)")
    reason: str = Field(description="out_of_stock, line_limit, other_currency or cart_full")


class MergeOut(BaseModel):
    cart: CartOut
    adopted: bool = Field(
        description="True when the anonymous cart simply became the account's cart"
    )
    adjustments: list[MergeAdjustmentOut]
