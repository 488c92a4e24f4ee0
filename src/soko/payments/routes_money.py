"""Balances, payouts and commission, read and written over HTTP.

* ``GET /seller/balance``: the acting store's balance per currency and its history
  (ledger entries, newest first, in cursor pages), for any member of the store.
* ``POST /admin/payouts`` (``payouts:manage``, with an ``Idempotency-Key``) records money
  sent to a store's bank against its balance; ``GET /admin/payouts`` lists them.
* ``GET /admin/sellers/{seller_id}/balance`` (``payments:read_all``).
* ``PUT``/``GET /admin/sellers/{seller_id}/commission`` (``payments:manage`` /
  ``payments:read_all``): a store's commission rate, applied to later captures only.
* ``GET /admin/ledger/check`` (``payments:read_all``): the whole ledger's balance check.

Admin writes are recorded in the audit log. A store that does not exist answers 404.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.public import (
    PAYMENTS_MANAGE,
    PAYMENTS_READ_ALL,
    PAYOUTS_MANAGE,
    record_request_audit_event,
)
from soko.payments import ledger
from soko.payments.ledger_models import MEMO_MAX_LENGTH, REFERENCE_MAX_LENGTH, LedgerEntry, Payout
from soko.platform.auth import Principal, require
from soko.platform.errors import NotFound, problem_responses
from soko.platform.idempotency import IdempotencyDep
from soko.platform.money import MAX_AMOUNT_MINOR, UnknownCurrencyError, minor_units
from soko.platform.pagination import Keyset, Page, PageRequest, PageRequestDep, SortKey
from soko.platform.runtime import Runtime, RuntimeDep, SessionDep
from soko.sellers.public import ActingSellerDep, seller_cards

router = APIRouter()

PaymentsReader = Annotated[Principal, require(PAYMENTS_READ_ALL)]
PaymentsManager = Annotated[Principal, require(PAYMENTS_MANAGE)]
PayoutsManager = Annotated[Principal, require(PAYOUTS_MANAGE)]

# -- shapes ----------------------------------------------------------------------------------


class BalanceOut(BaseModel):
    currency: str
    balance_minor: int = Field(
        description="What the marketplace owes the store; negative when the store owes "
        "(a refund after a payout)."
    )


class BalanceEntryOut(BaseModel):
    id: uuid.UUID
    transaction_id: uuid.UUID
    kind: str = Field(description="capture, refund, payout or adjustment")
    reference: str = Field(
        description="The payment id of a capture, the refund id of a refund, the payout "
        "id of a payout, the admin's reference of an adjustment."
    )
    memo: str | None
    currency: str
    amount_minor: int = Field(description="The entry's effect on the balance: + credit, - debit.")
    payment_id: uuid.UUID | None
    order_id: uuid.UUID | None
    rate_bps: int | None = Field(description="The commission rate of a capture's share.")
    created_at: dt.datetime


class SellerBalanceOut(BaseModel):
    """The balances, then one page of the history; ``next_cursor`` pages the history."""

    seller_id: uuid.UUID
    balances: list[BalanceOut]
    items: list[BalanceEntryOut]
    next_cursor: str | None


class PayoutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seller_id: uuid.UUID
    amount_minor: int = Field(strict=True, gt=0, le=MAX_AMOUNT_MINOR)
    currency: str = Field(min_length=3, max_length=3)
    reference: str = Field(
        min_length=1,
        max_length=REFERENCE_MAX_LENGTH,
        description="The bank's or transfer's reference: one payout per store and reference.",
    )
    note: str | None = Field(None, max_length=MEMO_MAX_LENGTH)

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        try:
            minor_units(value)
        except UnknownCurrencyError:
            raise ValueError("is not an ISO 4217 currency code Soko knows") from None
        return value

    @field_validator("reference")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class PayoutOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    seller_id: uuid.UUID
    amount_minor: int
    currency: str
    reference: str
    note: str | None
    recorded_by: uuid.UUID | None
    created_at: dt.datetime
    transaction_id: uuid.UUID


class RecordedPayoutOut(PayoutOut):
    balance_after_minor: int = Field(description="The store's balance in the currency after it.")


class CommissionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate_bps: int | None = Field(
        strict=True,
        ge=0,
        le=ledger.BASIS_POINTS,
        description="Basis points (1000 = 10 %); null returns the store to the default rate.",
    )


class CommissionOut(BaseModel):
    seller_id: uuid.UUID
    rate_bps: int
    overridden: bool = Field(description="Whether an admin set this store's rate.")
    default_rate_bps: int
    updated_by: uuid.UUID | None
    updated_at: dt.datetime | None


class LedgerCheckOut(BaseModel):
    balanced: bool
    unbalanced_transaction_ids: list[uuid.UUID]
    unbalanced_truncated: bool
    trial_balance: dict[str, int] = Field(description="Currency -> sum of every entry: zero.")
    entries: int
    seconds: float


# -- shared ----------------------------------------------------------------------------------


async def _known_seller(session: AsyncSession, seller_id: uuid.UUID) -> None:
    if seller_id not in await seller_cards(session, [seller_id]):
        raise NotFound("No store has this id.")


async def _balance_page(
    session: AsyncSession, seller_id: uuid.UUID, page: PageRequest, *, scope: str
) -> SellerBalanceOut:
    listing = Keyset(
        f"{scope}:{seller_id}",
        SortKey(LedgerEntry.created_at, descending=True),
        id_column=LedgerEntry.id,
    )
    rows, next_cursor = await listing.fetch(session, ledger.seller_history(seller_id), page)
    balances = await ledger.seller_balance(session, seller_id)
    return SellerBalanceOut(
        seller_id=seller_id,
        balances=[BalanceOut(currency=c, balance_minor=b) for c, b in sorted(balances.items())],
        items=[
            BalanceEntryOut(
                id=row.id,
                transaction_id=row.transaction_id,
                kind=row.kind,
                reference=row.reference,
                memo=row.memo,
                currency=row.currency,
                amount_minor=row.effect_minor,
                payment_id=row.payment_id,
                order_id=row.order_id,
                rate_bps=row.rate_bps,
                created_at=row.created_at,
            )
            for row in rows
        ],
        next_cursor=next_cursor,
    )


async def _audit(
    session: AsyncSession,
    runtime: Runtime,
    request: Request,
    *,
    action: str,
    actor: Principal,
    seller_id: uuid.UUID,
    data: dict[str, Any],
) -> None:
    await record_request_audit_event(
        session,
        request,
        runtime,
        action=action,
        actor_id=actor.user_id,
        target_type="seller",
        target_id=seller_id,
        data=data,
    )


# -- the store's own balance -----------------------------------------------------------------


@router.get(
    "/seller/balance",
    response_model=SellerBalanceOut,
    summary="The store's balance and its history",
    responses=problem_responses(400, 403),
)
async def read_store_balance(
    seller: ActingSellerDep, session: SessionDep, page: PageRequestDep
) -> SellerBalanceOut:
    """What the marketplace owes the store, per currency, and the ledger entries that
    made it, newest first: captures (the order's subtotal less commission), refunds,
    payouts and adjustments. Any member of the store may read it."""
    return await _balance_page(session, seller.seller_id, page, scope="payments.balance")


# -- admin: balances and payouts -------------------------------------------------------------


@router.get(
    "/admin/sellers/{seller_id}/balance",
    response_model=SellerBalanceOut,
    summary="A store's balance and its history",
    responses=problem_responses(404),
)
async def admin_read_balance(
    _reader: PaymentsReader, seller_id: uuid.UUID, session: SessionDep, page: PageRequestDep
) -> SellerBalanceOut:
    await _known_seller(session, seller_id)
    return await _balance_page(session, seller_id, page, scope="payments.admin_balance")


@router.post(
    "/admin/payouts",
    status_code=201,
    response_model=RecordedPayoutOut,
    summary="Record a payout to a store",
    responses=problem_responses(400, 404, 409, 422),
)
async def record_payout(
    admin: PayoutsManager,
    # Before the session: the key is claimed in a transaction of its own, committed first.
    claim: IdempotencyDep,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
    body: PayoutIn,
) -> Response:
    """Record money sent to a store's bank: it leaves the store's balance. Refused (409
    ``payout-exceeds-balance``) beyond the balance in that currency, and (409
    ``payout-already-recorded``) when the store already has a payout with this
    reference. Send an ``Idempotency-Key``: a retry answers the first payout."""
    if claim.replay is not None:
        return claim.replay
    await _known_seller(session, body.seller_id)
    payout = await ledger.record_payout(
        session,
        runtime,
        seller_id=body.seller_id,
        amount_minor=body.amount_minor,
        currency=body.currency,
        reference=body.reference,
        actor_id=admin.user_id,
        note=body.note,
    )
    await _audit(
        session,
        runtime,
        request,
        action="payout.recorded",
        actor=admin,
        seller_id=body.seller_id,
        data={
            "payout_id": str(payout.id),
            "amount_minor": payout.amount_minor,
            "currency": payout.currency,
            "reference": payout.reference,
        },
    )
    return await claim.answer(
        session,
        RecordedPayoutOut(
            id=payout.id,
            seller_id=payout.seller_id,
            amount_minor=payout.amount_minor,
            currency=payout.currency,
            reference=payout.reference,
            note=payout.note,
            recorded_by=payout.recorded_by,
            created_at=payout.created_at,
            transaction_id=payout.transaction_id,
            balance_after_minor=payout.balance_after_minor,
        ),
        status_code=201,
    )


@router.get(
    "/admin/payouts",
    response_model=Page[PayoutOut],
    summary="Recorded payouts, newest first",
)
async def list_payouts(
    _reader: PaymentsReader,
    session: SessionDep,
    page: PageRequestDep,
    seller_id: Annotated[uuid.UUID | None, Query(description="Only this store's")] = None,
) -> Page[PayoutOut]:
    statement = select(Payout)
    if seller_id is not None:
        statement = statement.where(Payout.seller_id == seller_id)
    listing = Keyset(
        f"payments.payouts:{seller_id or 'all'}",
        SortKey(Payout.created_at, descending=True),
        id_column=Payout.id,
    )
    rows, next_cursor = await listing.fetch(session, statement, page)
    return Page[PayoutOut](
        items=[PayoutOut.model_validate(row) for row in rows], next_cursor=next_cursor
    )


# -- admin: commission -----------------------------------------------------------------------


def _commission_out(runtime: Runtime, setting: ledger.CommissionSetting) -> CommissionOut:
    return CommissionOut(
        seller_id=setting.seller_id,
        rate_bps=setting.rate_bps,
        overridden=setting.overridden,
        default_rate_bps=runtime.settings.commission_bps,
        updated_by=setting.updated_by,
        updated_at=setting.updated_at,
    )


@router.get(
    "/admin/sellers/{seller_id}/commission",
    response_model=CommissionOut,
    summary="A store's commission rate",
    responses=problem_responses(404),
)
async def read_commission(
    _reader: PaymentsReader, seller_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep
) -> CommissionOut:
    await _known_seller(session, seller_id)
    return _commission_out(runtime, await ledger.commission_rate_for(session, runtime, seller_id))


@router.put(
    "/admin/sellers/{seller_id}/commission",
    response_model=CommissionOut,
    summary="Set a store's commission rate",
    responses=problem_responses(404, 422),
)
async def set_commission(
    admin: PaymentsManager,
    seller_id: uuid.UUID,
    body: CommissionIn,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> CommissionOut:
    """The rate applies to captures from now on; what was captured keeps its rate, and
    its refunds reverse the commission at that rate."""
    await _known_seller(session, seller_id)
    before = await ledger.commission_rate_for(session, runtime, seller_id)
    setting = await ledger.set_commission_rate(
        session, runtime, seller_id=seller_id, rate_bps=body.rate_bps, actor_id=admin.user_id
    )
    await _audit(
        session,
        runtime,
        request,
        action="commission.changed",
        actor=admin,
        seller_id=seller_id,
        data={"from_bps": before.rate_bps, "to_bps": setting.rate_bps, "override": body.rate_bps},
    )
    return _commission_out(runtime, setting)


# -- admin: the ledger -----------------------------------------------------------------------


@router.get(
    "/admin/ledger/check",
    response_model=LedgerCheckOut,
    summary="Check that the ledger balances",
)
async def check_ledger(_reader: PaymentsReader, session: SessionDep) -> LedgerCheckOut:
    """Every transaction's entries sum to zero, and so does every currency's: two
    set-based queries over the whole ledger."""
    result = await ledger.verify_ledger(session)
    return LedgerCheckOut(
        balanced=result.balanced,
        unbalanced_transaction_ids=list(result.unbalanced_transaction_ids),
        unbalanced_truncated=result.unbalanced_truncated,
        trial_balance=result.trial_balance,
        entries=result.entries,
        seconds=round(result.seconds, 6),
    )
