"""Request and response shapes of checkout, orders and disputes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints

from soko.orders.models import (
    CARRIER_MAX_LENGTH,
    DETAILS_MAX_LENGTH,
    REASON_MAX_LENGTH,
    TRACKING_MAX_LENGTH,
    CheckoutGroup,
    Dispute,
    DisputeReason,
    Order,
    OrderLine,
    OrderTransition,
)
from soko.orders.states import OrderStatus
from soko.platform.money import MAX_AMOUNT_MINOR, Money

Text = Annotated[str, StringConstraints(strip_whitespace=True)]

# -- requests -------------------------------------------------------------------------------------


class CheckoutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cart_id: uuid.UUID
    accept_price_changes: bool = Field(
        default=False,
        description="Pay today's prices for lines whose price changed since they were added; "
        "without it such a checkout answers 409 cart-prices-changed",
    )
    expected_total_minor: int | None = Field(
        default=None,
        strict=True,
        ge=0,
        le=MAX_AMOUNT_MINOR,
        description="The total the buyer was shown, in the cart's currency's minor units; "
        "a checkout that would cost anything else answers 409 checkout-total-changed",
    )
    shipping_address: dict[str, Any] | None = Field(
        default=None,
        max_length=30,
        description="Where to deliver, as the storefront collects it; kept on the checkout",
    )


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[Text, StringConstraints(max_length=REASON_MAX_LENGTH)] = ""


class ShipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    carrier: Annotated[Text, StringConstraints(min_length=1, max_length=CARRIER_MAX_LENGTH)]
    tracking_number: Annotated[
        Text, StringConstraints(min_length=1, max_length=TRACKING_MAX_LENGTH)
    ]


class DisputeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: DisputeReason
    details: Annotated[Text, StringConstraints(min_length=1, max_length=DETAILS_MAX_LENGTH)]
    evidence_urls: list[HttpUrl] = Field(default_factory=list, max_length=10)


class DisputeResponseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response: Annotated[Text, StringConstraints(min_length=1, max_length=DETAILS_MAX_LENGTH)]


class ResolveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: Literal["refund", "reject"]
    refund_minor: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=MAX_AMOUNT_MINOR,
        description="For a refund: how much, in the order's minor units (default: all of it)",
    )
    note: Annotated[Text, StringConstraints(max_length=DETAILS_MAX_LENGTH)] = ""


# -- responses ------------------------------------------------------------------------------------


class OrderLineOut(BaseModel):
    """A line as it was at checkout."""

    id: uuid.UUID
    variant_id: uuid.UUID
    product_id: uuid.UUID
    title: str
    sku: str
    options: dict[str, str]
    unit_price: Money
    quantity: int
    line_total: Money

    @classmethod
    def of(cls, line: OrderLine, currency: str) -> OrderLineOut:
        return cls(
            id=line.id,
            variant_id=line.variant_id,
            product_id=line.product_id,
            title=line.title,
            sku=line.sku,
            options=dict(line.options),
            unit_price=Money(line.unit_price_minor, currency),
            quantity=line.quantity,
            line_total=Money(line.line_total_minor, currency),
        )


class TransitionOut(BaseModel):
    """One move of the order: who made it and when."""

    model_config = ConfigDict(from_attributes=True)

    from_status: OrderStatus
    to_status: OrderStatus
    actor_kind: str
    actor_id: uuid.UUID | None
    reason: str
    at: dt.datetime


class DisputeOut(BaseModel):
    id: uuid.UUID
    order_id: uuid.UUID
    status: str
    reason: DisputeReason
    details: str
    evidence_urls: list[str]
    seller_response: str | None
    responded_at: dt.datetime | None
    resolution_note: str | None
    refund: Money | None
    opened_at: dt.datetime
    resolved_at: dt.datetime | None

    @classmethod
    def of(cls, dispute: Dispute, currency: str) -> DisputeOut:
        return cls(
            id=dispute.id,
            order_id=dispute.order_id,
            status=dispute.status,
            reason=DisputeReason(dispute.reason),
            details=dispute.details,
            evidence_urls=list(dispute.evidence_urls),
            seller_response=dispute.seller_response,
            responded_at=dispute.responded_at,
            resolution_note=dispute.resolution_note,
            refund=Money(dispute.refund_minor, currency) if dispute.refund_minor else None,
            opened_at=dispute.opened_at,
            resolved_at=dispute.resolved_at,
        )


class OrderSummaryOut(BaseModel):
    """An order in a list."""

    id: uuid.UUID
    number: str
    group_id: uuid.UUID
    seller_id: uuid.UUID
    buyer_id: uuid.UUID
    status: OrderStatus
    subtotal: Money
    item_count: int
    carrier: str | None
    tracking_number: str | None
    placed_at: dt.datetime
    paid_at: dt.datetime | None
    shipped_at: dt.datetime | None
    delivered_at: dt.datetime | None
    completed_at: dt.datetime | None
    cancelled_at: dt.datetime | None
    updated_at: dt.datetime
    version: int

    @classmethod
    def summary(cls, order: Order) -> dict[str, Any]:
        return {
            "id": order.id,
            "number": order.number,
            "group_id": order.group_id,
            "seller_id": order.seller_id,
            "buyer_id": order.buyer_id,
            "status": OrderStatus(order.status),
            "subtotal": Money(order.subtotal_minor, order.currency),
            "item_count": order.item_count,
            "carrier": order.carrier,
            "tracking_number": order.tracking_number,
            "placed_at": order.placed_at,
            "paid_at": order.paid_at,
            "shipped_at": order.shipped_at,
            "delivered_at": order.delivered_at,
            "completed_at": order.completed_at,
            "cancelled_at": order.cancelled_at,
            "updated_at": order.updated_at,
            "version": order.version,
        }

    @classmethod
    def of(cls, order: Order) -> OrderSummaryOut:
        return cls(**cls.summary(order))


class OrderOut(OrderSummaryOut):
    """An order with its lines, its moves and its dispute, if any."""

    lines: list[OrderLineOut]
    transitions: list[TransitionOut]
    dispute: DisputeOut | None
    dispute_window_closes_at: dt.datetime | None = Field(
        description="Until when the buyer may open a dispute (once delivered)"
    )
    shipping_address: dict[str, Any] | None = Field(
        description="Where to deliver, as given at checkout"
    )

    @classmethod
    def full(
        cls,
        order: Order,
        lines: Sequence[OrderLine],
        transitions: Sequence[OrderTransition],
        dispute: Dispute | None,
        dispute_window_closes_at: dt.datetime | None,
        shipping_address: dict[str, Any] | None,
    ) -> OrderOut:
        return cls(
            **cls.summary(order),
            shipping_address=shipping_address,
            lines=[OrderLineOut.of(line, order.currency) for line in lines],
            transitions=[TransitionOut.model_validate(move) for move in transitions],
            dispute=DisputeOut.of(dispute, order.currency) if dispute is not None else None,
            dispute_window_closes_at=dispute_window_closes_at,
        )


class CheckoutOrderOut(BaseModel):
    """One seller's order of a checkout."""

    id: uuid.UUID
    number: str
    seller_id: uuid.UUID
    status: OrderStatus
    subtotal: Money
    item_count: int
    placed_at: dt.datetime
    lines: list[OrderLineOut]


class CheckoutGroupOut(BaseModel):
    """A checkout: the orders placed together, paid once."""

    id: uuid.UUID
    status: str
    total: Money = Field(
        description="What the buyer pays or paid: every order not cancelled before payment "
        "(a refund after payment is shown on the payment, not here)"
    )
    reservation_expires_at: dt.datetime = Field(
        description="The stock is held until then; unpaid by then, the checkout expires"
    )
    shipping_address: dict[str, Any] | None
    created_at: dt.datetime
    paid_at: dt.datetime | None
    orders: list[CheckoutOrderOut]

    @classmethod
    def of(
        cls,
        group: CheckoutGroup,
        orders: Sequence[Order],
        lines: dict[uuid.UUID, list[OrderLine]],
    ) -> CheckoutGroupOut:
        return cls(
            id=group.id,
            status=group.status,
            total=Money(group.total_minor, group.currency),
            reservation_expires_at=group.reservation_expires_at,
            shipping_address=group.shipping_address,
            created_at=group.created_at,
            paid_at=group.paid_at,
            orders=[
                CheckoutOrderOut(
                    id=order.id,
                    number=order.number,
                    seller_id=order.seller_id,
                    status=OrderStatus(order.status),
                    subtotal=Money(order.subtotal_minor, order.currency),
                    item_count=order.item_count,
                    placed_at=order.placed_at,
                    lines=[OrderLineOut.of(line, order.currency) for line in lines[order.id]],
                )
                for order in orders
            ],
        )


class AdminDisputeOut(DisputeOut):
    """A dispute as the marketplace's staff see it in their queue."""

    buyer_id: uuid.UUID
    seller_id: uuid.UUID
    order_number: str
    order_subtotal: Money

    @classmethod
    def of_order(cls, dispute: Dispute, order: Order) -> AdminDisputeOut:
        base = DisputeOut.of(dispute, order.currency).model_dump()
        return cls(
            **base,
            buyer_id=dispute.buyer_id,
            seller_id=dispute.seller_id,
            order_number=order.number,
            order_subtotal=Money(order.subtotal_minor, order.currency),
        )
