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

router = APIRouter(include_in_schema=False)
Visitor = Annotated[Principal | None, public()]

_STYLE = "body{font-family:system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem}"
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
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{title}</h1><p>{text}</p></body></html>"
    )
    return HTMLResponse(
        html,
        headers={
            "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            "cache-control": "no-store",
        },
    )
