"""``/payments/return``: where a provider's page sends the buyer back when no storefront
page is configured (``SOKO_PAYMENT_RETURN_URL`` empty).

A plain page, outside ``/api/v1``: it tells the buyer that the payment is being
confirmed and that their orders show the result. It reads nothing from the database and
trusts nothing in its query (providers append their own parameters, which anyone can
forge): the order's state comes only from the provider's confirmed webhook.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from soko.platform.auth import Principal, public
from soko.platform.pages import plain_page

router = APIRouter(include_in_schema=False)
Visitor = Annotated[Principal | None, public()]

# Words the providers put in the return URL for a payment that did not go through.
_NOT_PAID = frozenset({"failed", "abandoned", "cancelled", "canceled", "declined"})


@router.get("/payments/return", response_class=HTMLResponse)
async def payment_return(_visitor: Visitor, status: str = "") -> HTMLResponse:
    if status.strip().lower() in _NOT_PAID:
        title = "The payment did not go through"
        text = "No money was taken. You can try again from your orders."
    else:
        title = "Thank you"
        text = (
            "Your payment is being confirmed with the payment provider. Your orders show "
            "it as paid within a few seconds; you may close this page."
        )
    return plain_page(title, f"<p>{text}</p>")
