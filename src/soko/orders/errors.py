"""The orders domain's problem types."""

from __future__ import annotations

from soko.platform.errors import ProblemError


class CheckoutCartEmpty(ProblemError):
    slug = "checkout-cart-empty"
    title = "The cart is empty"
    status = 409
    description = "A checkout needs at least one line in the cart."


class CheckoutItemsUnavailable(ProblemError):
    slug = "checkout-items-unavailable"
    title = "Some items cannot be bought now"
    status = 409
    description = (
        "Lines of the cart are no longer for sale: the product was unpublished or the "
        "variant archived, the store may not sell right now, or the price is now in "
        "another currency. `unavailable` lists each line's `variant_id` and `reason`."
    )


class CartPricesChanged(ProblemError):
    slug = "cart-prices-changed"
    title = "Prices changed since the items were added"
    status = 409
    description = (
        "Some lines cost something else now than when they were added to the cart. "
        "`lines` lists each with `price_when_added` and `price_now` (minor units); check "
        "out again with `accept_price_changes: true` to pay the prices of now."
    )


class CheckoutTotalChanged(ProblemError):
    slug = "checkout-total-changed"
    title = "The total is not the one expected"
    status = 409
    description = (
        "The checkout would cost `total_minor`, not the `expected_total_minor` the request "
        "named: show the buyer the new total before checking out again."
    )


class CheckoutTotalTooLarge(ProblemError):
    slug = "checkout-total-too-large"
    title = "The total is more than one checkout can take"
    status = 422
    description = (
        "The cart adds up to more than `max_total_minor` minor units, the most one "
        "checkout (and one payment) can carry: check out fewer items at a time."
    )


class OrderStateConflict(ProblemError):
    slug = "order-state-conflict"
    title = "The order is not in a state that allows this"
    status = 409
    description = (
        "The order's state does not allow this move (it was already moved on, or it is "
        "too early). `current_status` is the order's state now; `allowed_actions` what "
        "you may still do."
    )


class DisputeWindowClosed(ProblemError):
    slug = "dispute-window-closed"
    title = "The dispute window has closed"
    status = 409
    description = (
        "A dispute must be opened within the marketplace's dispute window after delivery "
        "(`window_days`); it ended at `closed_at`."
    )


class DisputeTooEarly(ProblemError):
    slug = "dispute-too-early"
    title = "It is too early to dispute this order"
    status = 409
    description = (
        "An order shipped but not delivered may be disputed as not received once it is "
        "late: `not_received_after_days` after it shipped, from `opens_at`."
    )


class DisputeStateConflict(ProblemError):
    slug = "dispute-state-conflict"
    title = "The dispute is not in a state that allows this"
    status = 409
    description = (
        "A seller answers an open dispute once, and an administrator resolves a dispute "
        "once; `current_status` is where the dispute is now."
    )


class CheckoutNeedsVerifiedContact(ProblemError):
    slug = "checkout-contact-unverified"
    title = "Verify your email or phone before checking out"
    status = 403
    description = (
        "A checkout holds stock, so only accounts with a verified email address or phone "
        "number may place one: verify yours (the link mailed at sign-up, or a code by SMS), "
        "then check out again with a new Idempotency-Key."
    )
