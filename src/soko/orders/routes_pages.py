"""``/orders/{id}``: where the "view the order" links of order emails lead when the
marketplace has no page of its own (``SOKO_APP_URL`` empty). A plain page that reads
nothing: the order itself is for its buyer and store, signed in."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from soko.platform.auth import Principal, public
from soko.platform.pages import plain_page

router = APIRouter(include_in_schema=False)


@router.get("/orders/{order_id}", response_class=HTMLResponse)
async def order_page(
    order_id: uuid.UUID, _visitor: Annotated[Principal | None, public()]
) -> HTMLResponse:
    return plain_page(
        "Your order",
        "<p>Sign in to the marketplace to see this order, where it is, and what you can "
        "still do with it.</p>"
        f"<p>For developers: <code>GET /api/v1/orders/{order_id}</code> (the buyer) or "
        f"<code>GET /api/v1/seller/orders/{order_id}</code> (the store).</p>",
    )
