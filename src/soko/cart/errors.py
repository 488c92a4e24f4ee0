"""The cart domain's problem types."""

from __future__ import annotations

from soko.platform.errors import Conflict, NotFound


class CartNotFound(NotFound):
    """No cart at this id that the caller may see (the two are answered alike)."""

    def __init__(self, detail: str = "No such cart.") -> None:
        super().__init__(detail)


class CartChanged(Conflict):
    slug = "cart-changed"
    title = "The cart changed"
    status = 409
    description = (
        "The cart was changed, checked out, merged or expired after it was read: read it "
        "again before checking out."
    )


class CartFull(Conflict):
    slug = "cart-full"
    title = "The cart holds as many lines as it may"
    status = 409
    description = (
        "A cart holds at most `max_lines` different variants; add more of a line already "
        "there, or check out and start another cart."
    )


class CartClosed(Conflict):
    slug = "cart-closed"
    title = "The cart is closed"
    status = 409
    description = (
        "The cart was merged into its owner's cart, checked out or expired; it takes no "
        "more changes. `merged_into` names the cart that took its lines, when there is one."
    )
