"""The problem types of paying, inbound payment webhooks, refunds and the payments desk.
Documented in ``docs/problems/payments.md``."""

from __future__ import annotations

from soko.platform.errors import ProblemError


class PaymentProviderUnavailable(ProblemError):
    slug = "payment-provider-unavailable"
    title = "The payment provider cannot be reached now"
    status = 503
    description = (
        "The provider timed out, failed or is resting after repeated failures. The attempt "
        "is stored as failed and no money moved: try again after `Retry-After` seconds, "
        "with a new `Idempotency-Key`, or choose another provider."
    )


class PaymentProviderRefused(ProblemError):
    slug = "payment-provider-refused"
    title = "The payment provider refused the payment"
    status = 502
    description = (
        "The provider answered that it will not start this payment (a configuration or "
        "account problem on its side). The attempt is stored as failed; no money moved."
    )


class GroupAlreadyPaid(ProblemError):
    slug = "group-already-paid"
    title = "This checkout is already paid"
    status = 409
    description = "The checkout group has a succeeded payment; it cannot be paid again."


class GroupNotPayable(ProblemError):
    slug = "group-not-payable"
    title = "This checkout cannot be paid"
    status = 409
    description = (
        "The checkout group is not waiting for payment: it expired (its stock holds ran "
        "out) or every order in it was cancelled. `group_status` says which."
    )


class PaymentWebhookRejected(ProblemError):
    slug = "payment-webhook-rejected"
    title = "The webhook could not be verified"
    status = 400
    description = (
        "The signature, secret or timestamp of the webhook does not check out, or its body "
        "cannot be parsed. Nothing was stored or changed."
    )


class RefundExceedsPayment(ProblemError):
    slug = "refund-exceeds-payment"
    title = "The refund is more than remains refundable"
    status = 409
    description = (
        "The payment (or the order's share of it) has less left to refund than asked. "
        "`refundable_minor` is what remains."
    )


class PaymentNotRefundable(ProblemError):
    slug = "payment-not-refundable"
    title = "This payment has taken no money to refund"
    status = 409
    description = (
        "Only a succeeded (or duplicate) payment can be refunded. `payment_status` is its state."
    )


class PaymentNotFlagged(ProblemError):
    slug = "payment-not-flagged"
    title = "This payment has no flag to resolve"
    status = 409
    description = "The payment carries no flag (it was resolved already, or never flagged)."
