"""The payments desk (``/api/v1/admin/payments``): every payment with its webhooks and
refunds, flags to resolve, and refunds by an admin."""

from __future__ import annotations

import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, Query, Response
from sqlalchemy import select, update

from soko.identity.public import PAYMENTS_MANAGE, PAYMENTS_READ_ALL
from soko.payments.errors import PaymentNotFlagged
from soko.payments.payment_models import (
    EventStatus,
    Payment,
    PaymentFlag,
    PaymentStatus,
    Refund,
    WebhookEvent,
)
from soko.payments.refunds import admin_refund
from soko.payments.schemas import (
    AdminPaymentDetailOut,
    AdminPaymentOut,
    RefundIn,
    RefundOut,
    ResolveFlagIn,
    WebhookEventOut,
)
from soko.platform.auth import Principal, require
from soko.platform.errors import NotFound, problem_responses
from soko.platform.idempotency import IdempotencyDep
from soko.platform.pagination import Keyset, Page, PageRequestDep, SortKey, page_response
from soko.platform.runtime import RuntimeDep, SessionDep

log = structlog.get_logger("soko.payments")

router = APIRouter()

PAYMENT_LISTING = Keyset(
    "payments.admin.payments", SortKey(Payment.created_at, descending=True), id_column=Payment.id
)
EVENT_LISTING = Keyset(
    "payments.admin.webhook_events",
    SortKey(WebhookEvent.received_at, descending=True),
    id_column=WebhookEvent.id,
)


@router.get(
    "/payments",
    response_model=Page[AdminPaymentOut],
    summary="Every payment, newest first",
)
async def list_payments(
    _staff: Annotated[Principal, require(PAYMENTS_READ_ALL)],
    session: SessionDep,
    page: PageRequestDep,
    status: Annotated[PaymentStatus | None, Query(description="Only this state")] = None,
    flagged: Annotated[bool | None, Query(description="Only flagged (or unflagged) ones")] = None,
    flag: Annotated[PaymentFlag | None, Query(description="Only this flag")] = None,
    provider: Annotated[str | None, Query(max_length=40)] = None,
    group_id: Annotated[uuid.UUID | None, Query()] = None,
) -> Response:
    statement = select(Payment)
    if status is not None:
        statement = statement.where(Payment.status == status.value)
    if flagged is not None:
        statement = statement.where(
            Payment.flag.is_not(None) if flagged else Payment.flag.is_(None)
        )
    if flag is not None:
        statement = statement.where(Payment.flag == flag.value)
    if provider is not None:
        statement = statement.where(Payment.provider == provider)
    if group_id is not None:
        statement = statement.where(Payment.group_id == group_id)
    rows, next_cursor = await PAYMENT_LISTING.fetch(session, statement, page)
    return page_response([AdminPaymentOut.of(row) for row in rows], next_cursor)


@router.get(
    "/payments/webhook-events",
    response_model=Page[WebhookEventOut],
    summary="Stored payment webhooks, newest first (unmatched ones to look at)",
)
async def list_webhook_events(
    _staff: Annotated[Principal, require(PAYMENTS_READ_ALL)],
    session: SessionDep,
    page: PageRequestDep,
    status: Annotated[EventStatus | None, Query()] = None,
    provider: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    statement = select(WebhookEvent)
    if status is not None:
        statement = statement.where(WebhookEvent.status == status.value)
    if provider is not None:
        statement = statement.where(WebhookEvent.provider == provider)
    rows, next_cursor = await EVENT_LISTING.fetch(session, statement, page)
    return page_response([WebhookEventOut.of(row) for row in rows], next_cursor)


async def _payment(session: SessionDep, payment_id: uuid.UUID) -> Payment:
    payment = await session.get(Payment, payment_id)
    if payment is None:
        raise NotFound("No such payment.")
    return payment


async def _detail(session: SessionDep, payment: Payment) -> AdminPaymentDetailOut:
    events = (
        await session.scalars(
            select(WebhookEvent)
            .where(WebhookEvent.payment_id == payment.id)
            .order_by(WebhookEvent.received_at, WebhookEvent.id)
        )
    ).all()
    refunds = (
        await session.scalars(
            select(Refund).where(Refund.payment_id == payment.id).order_by(Refund.id)
        )
    ).all()
    return AdminPaymentDetailOut.full(payment, events, refunds)


@router.get(
    "/payments/{payment_id}",
    response_model=AdminPaymentDetailOut,
    summary="One payment with its webhooks and refunds",
    responses=problem_responses(404),
)
async def read_payment(
    _staff: Annotated[Principal, require(PAYMENTS_READ_ALL)],
    payment_id: uuid.UUID,
    session: SessionDep,
) -> AdminPaymentDetailOut:
    return await _detail(session, await _payment(session, payment_id))


@router.post(
    "/payments/{payment_id}/resolve-flag",
    response_model=AdminPaymentDetailOut,
    summary="Mark a payment's flag as looked at",
    responses=problem_responses(404, 409),
)
async def resolve_flag(
    staff: Annotated[Principal, require(PAYMENTS_MANAGE)],
    payment_id: uuid.UUID,
    body: ResolveFlagIn,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminPaymentDetailOut:
    payment = await _payment(session, payment_id)
    cleared = await session.execute(
        update(Payment)
        .where(Payment.id == payment_id, Payment.flag.is_not(None))
        .values(flag=None, flag_detail=None, updated_at=runtime.clock.now())
        .returning(Payment.flag)
        .execution_options(synchronize_session=False)
    )
    if cleared.first() is None:
        raise PaymentNotFlagged()
    await session.refresh(payment)
    log.info(
        "payment flag resolved",
        payment_id=str(payment_id),
        actor_id=str(staff.user_id),
        note=body.note,
    )
    return await _detail(session, payment)


@router.post(
    "/payments/{payment_id}/refunds",
    status_code=201,
    response_model=RefundOut,
    summary="Refund part or all of a payment",
    responses=problem_responses(400, 404, 409, 422),
)
async def refund_payment(
    staff: Annotated[Principal, require(PAYMENTS_MANAGE)],
    payment_id: uuid.UUID,
    claim: IdempotencyDep,
    session: SessionDep,
    runtime: RuntimeDep,
    body: RefundIn,
) -> Response:
    """Queue a refund of ``amount_minor`` (of ``order_id``'s share, when the payment
    paid several orders); it goes through the provider and then the ledger. Send an
    ``Idempotency-Key``."""
    if claim.replay is not None:
        return claim.replay
    payment = await _payment(session, payment_id)
    refund = await admin_refund(
        session,
        runtime,
        payment,
        amount_minor=body.amount_minor,
        order_id=body.order_id,
        reason=body.reason,
        actor_id=staff.user_id,
    )
    return await claim.answer(session, RefundOut.of(refund), status_code=201)
