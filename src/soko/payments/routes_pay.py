"""Paying a checkout group (``/api/v1/checkout/{group_id}/payments``) and reading one's
own payments (``/api/v1/payments/{payment_id}``)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from soko.orders.public import group_for_payment
from soko.payments import service
from soko.payments.schemas import PayIn, PaymentListOut, PaymentOut
from soko.platform.auth import SignedIn
from soko.platform.errors import NotFound, problem_responses
from soko.platform.idempotency import IdempotencyDep
from soko.platform.runtime import RuntimeDep, SessionDep

router = APIRouter()


@router.post(
    "/checkout/{group_id}/payments",
    status_code=201,
    response_model=PaymentOut,
    summary="Pay a checkout",
    responses=problem_responses(400, 404, 409, 422, 502, 503),
)
async def pay_checkout(
    principal: SignedIn,
    group_id: uuid.UUID,
    # Before the session: the key is claimed in a transaction of its own, committed first.
    claim: IdempotencyDep,
    session: SessionDep,
    runtime: RuntimeDep,
    body: PayIn,
) -> Response:
    """Start paying the checkout group with ``provider``: answers the payment and its
    ``next_action`` (a page to send the buyer to, or a client secret). A second attempt
    is allowed while earlier ones are pending or failed; the group is paid once (any
    second success is refunded automatically). Send an ``Idempotency-Key``."""
    if claim.replay is not None:
        return claim.replay
    # The checks and the stored attempt commit in their own short transaction, and the
    # provider is called with no transaction open: nothing is locked while it answers.
    plan = await service.plan_payment(runtime, principal.user_id, group_id, body.provider)
    outcome = await service.call_provider_start(plan)
    payment = await service.record_start(session, runtime, plan, outcome)
    return await claim.answer(
        session,
        PaymentOut.of(payment),
        status_code=201,
        headers={"Location": f"/api/v1/payments/{payment.id}"},
    )


@router.get(
    "/checkout/{group_id}/payments",
    response_model=PaymentListOut,
    summary="The payment attempts of one of your checkouts",
    responses=problem_responses(404),
)
async def list_checkout_payments(
    principal: SignedIn, group_id: uuid.UUID, session: SessionDep
) -> PaymentListOut:
    group = await group_for_payment(session, group_id)
    if group is None or group.buyer_id != principal.user_id:
        raise NotFound("No such checkout.")
    payments = await service.payments_of_group(session, group_id)
    return PaymentListOut(items=[PaymentOut.of(payment) for payment in payments])


@router.get(
    "/payments/{payment_id}",
    response_model=PaymentOut,
    summary="One of your payments",
    responses=problem_responses(404),
)
async def read_payment(
    principal: SignedIn, payment_id: uuid.UUID, session: SessionDep
) -> PaymentOut:
    return PaymentOut.of(await service.payment_for_buyer(session, payment_id, principal.user_id))
