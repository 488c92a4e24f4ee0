"""The ledger's problem types (documented in docs/problems/ledger.md)."""

from __future__ import annotations

from soko.platform.errors import ProblemError


class PayoutExceedsBalance(ProblemError):
    slug = "payout-exceeds-balance"
    title = "The payout is more than the seller's balance"
    status = 409
    description = (
        "A payout may not exceed what the marketplace owes the seller in that currency; "
        "`balance_minor` is the balance now. Nothing was recorded."
    )


class PayoutAlreadyRecorded(ProblemError):
    slug = "payout-already-recorded"
    title = "A payout with this reference is already recorded"
    status = 409
    description = (
        "The seller already has a payout with this reference (`payout_id`): the same "
        "transfer is never recorded twice. Nothing was recorded."
    )


class RefundExceedsCapture(ProblemError):
    slug = "refund-exceeds-capture"
    title = "The refund is more than what was captured"
    status = 409
    description = (
        "The refunds of an order (or of the part of a payment no order owed) would exceed "
        "what was captured for it; `refundable_minor` is what remains. Nothing was posted."
    )


class CommissionRateInvalid(ProblemError):
    slug = "commission-rate-invalid"
    title = "The commission rate is out of range"
    status = 422
    description = "A commission rate is in basis points, from 0 to 10000 (100 %)."


class LedgerUnbalanced(ProblemError):
    slug = "ledger-unbalanced"
    title = "A ledger transaction would not balance"
    status = 500
    description = (
        "The server refused to post a transaction whose entries do not sum to zero: a "
        "bug, logged with the request id. Nothing was posted."
    )
