"""Checkout (``/api/v1/checkout``): a signed-in buyer's cart becomes orders, once per
``Idempotency-Key``."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from soko.orders.checkout import (
    Answering,
    CheckoutRequest,
    PlacedCheckout,
    hold_stock,
    place_checkout,
)
from soko.orders.schemas import CheckoutGroupOut, CheckoutIn
from soko.orders.service import group_details
from soko.platform.auth import SignedIn
from soko.platform.errors import problem_responses
from soko.platform.idempotency import IdempotencyDep
from soko.platform.runtime import RuntimeDep, SessionDep

router = APIRouter()


@router.post(
    "",
    status_code=201,
    response_model=CheckoutGroupOut,
    summary="Check out a cart",
    responses=problem_responses(400, 404, 409, 422),
)
async def checkout(
    principal: SignedIn,
    # Before the session: the key is claimed in a transaction of its own, committed first.
    claim: IdempotencyDep,
    session: SessionDep,
    runtime: RuntimeDep,
    body: CheckoutIn,
) -> Response:
    """Turn the buyer's cart into one order per seller under one checkout group, paid
    once, with the stock held for ``SOKO_RESERVATION_HOLD_SECONDS``. Send an
    ``Idempotency-Key``: a retry with the same key and body answers the same checkout
    (with ``Idempotency-Replayed: true``) instead of placing it twice."""
    if claim.replay is not None:
        return claim.replay

    def answer(placed: PlacedCheckout) -> tuple[CheckoutGroupOut, int, dict[str, str]]:
        body = CheckoutGroupOut.of(placed.group, placed.orders, placed.lines)
        return body, 201, {"Location": f"/api/v1/checkout/{placed.group.id}"}

    placed = await place_checkout(
        session,
        runtime,
        principal.user_id,
        CheckoutRequest(
            cart_id=body.cart_id,
            accept_price_changes=body.accept_price_changes,
            expected_total_minor=body.expected_total_minor,
            shipping_address=body.shipping_address,
        ),
        # On PostgreSQL the writes and this answer are one statement, committed.
        Answering(claim, answer),
    )
    if placed.response is not None:
        return placed.response
    content, status_code, headers = answer(placed)
    response = await claim.answer(session, content, status_code=status_code, headers=headers)
    # On SQLite, last, right before the commit (the stock rows stay locked from this
    # UPDATE until the commit); on PostgreSQL place_checkout held the stock already, in
    # a statement committed on its own (ADR 0016), and this does nothing.
    await hold_stock(session, runtime, placed)
    return response


@router.get(
    "/{group_id}",
    response_model=CheckoutGroupOut,
    summary="One of your checkouts",
    responses=problem_responses(404),
)
async def read_checkout(
    principal: SignedIn, group_id: uuid.UUID, session: SessionDep
) -> CheckoutGroupOut:
    details = await group_details(session, group_id, buyer_id=principal.user_id)
    return CheckoutGroupOut.of(details.group, details.orders, details.lines)
