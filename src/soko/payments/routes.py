"""The payments domain's HTTP routes, assembled from one module per audience. The
sandbox provider's payment page and the page a buyer returns to after paying are served
outside ``/api/v1`` (``root_router``)."""

from __future__ import annotations

from fastapi import APIRouter

from soko.payments import (
    routes_admin,
    routes_money,
    routes_pay,
    routes_return,
    routes_sandbox,
    routes_webhooks,
)

router = APIRouter()
router.include_router(routes_pay.router, tags=["payments"])
router.include_router(routes_webhooks.router, tags=["payment webhooks"])
router.include_router(routes_money.router, tags=["payouts and balances"])
router.include_router(routes_admin.router, prefix="/admin", tags=["administration"])
root_router = APIRouter()
root_router.include_router(routes_sandbox.router)
root_router.include_router(routes_return.router)
