"""The one interface every payment provider implements, and the values that cross it.

A provider starts a payment for an amount in minor units and answers what the buyer's
client needs next (a page to redirect to, a client secret for an embedded form), checks
and parses the webhooks it sends, tells a payment's current state when asked, and
refunds in full or in part. Soko never trusts a webhook alone: before an order is marked
paid, the amount, currency and state are confirmed with :meth:`PaymentProvider.fetch`.

Adapters live beside this module (``stripe``, ``paystack``, ``flutterwave``,
``sandbox``); none of them is imported by the payments domain except through
:func:`soko.payments.providers.registry.build_providers`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from soko.platform.money import MAX_AMOUNT_MINOR


class ProviderStatus(StrEnum):
    """A payment's state as a provider reports it, in Soko's words.

    ``pending``: started, no money yet (the buyer is on the page, a transfer is on its
    way). ``succeeded``: captured. ``failed``: declined or errored; the buyer may try
    again. ``abandoned``: the buyer left, or the provider gave up waiting."""

    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"
    abandoned = "abandoned"


class NextActionKind(StrEnum):
    redirect = "redirect"  # send the buyer's browser to ``url`` (Paystack, Flutterwave, sandbox)
    client_secret = "client_secret"  # confirm in the client with ``client_secret`` (Stripe)


@dataclass(frozen=True, slots=True)
class PaymentStart:
    """What Soko asks a provider to collect.

    ``reference`` is Soko's payment id as text: unique, sent to the provider as its
    reference / ``tx_ref`` / metadata, and used as the provider-side idempotency key, so
    a retried start never opens a second charge."""

    reference: str
    amount_minor: int
    currency: str
    customer_email: str | None
    return_url: str
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StartedPayment:
    """The provider's answer to a start: its own id for the payment and what the
    buyer's client does next."""

    provider_payment_id: str
    next_action: NextActionKind
    url: str | None = None
    client_secret: str | None = None


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """One verified webhook, parsed.

    ``event_id`` is unique per provider (Stripe's ``evt_...``; for providers without
    one, a digest of what identifies the delivery) so a duplicate or replay is
    recognised. ``reference`` is Soko's payment reference when the event names one;
    ``provider_payment_id`` the provider's id. ``status`` is ``None`` for events Soko
    stores but does not act on."""

    provider: str
    event_id: str
    event_type: str
    reference: str | None
    provider_payment_id: str | None
    status: ProviderStatus | None
    amount_minor: int | None
    currency: str | None
    occurred_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        # Every adapter builds its event inside its verification, so an amount no payment
        # can have is refused as an unreadable body, never stored (a database integer
        # holds neither it nor a negative one's meaning).
        if self.amount_minor is not None and not 0 <= self.amount_minor <= MAX_AMOUNT_MINOR:
            raise WebhookRejectedError("the event's amount is out of range")


@dataclass(frozen=True, slots=True)
class PaymentState:
    """A payment as the provider's API reports it when asked (the truth Soko acts on)."""

    provider_payment_id: str
    reference: str | None
    status: ProviderStatus
    amount_minor: int
    currency: str
    failure_reason: str | None = None


class RefundStatus(StrEnum):
    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"


@dataclass(frozen=True, slots=True)
class RefundRequest:
    """A refund of ``amount_minor`` of a captured payment. ``reference`` (Soko's refund
    id) is the provider-side idempotency key where the provider has one."""

    reference: str
    provider_payment_id: str
    payment_reference: str
    amount_minor: int
    currency: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RefundResult:
    provider_refund_id: str
    status: RefundStatus


class ProviderError(Exception):
    """The provider could not be reached, timed out, or answered an error. ``retryable``
    says whether trying again later may succeed (timeouts, 5xx, 429, an open circuit)."""

    def __init__(self, provider: str, message: str, *, retryable: bool) -> None:
        self.provider = provider
        self.retryable = retryable
        super().__init__(f"{provider}: {message}")


class ProviderUnavailableError(ProviderError):
    """The provider's circuit is open: Soko is not calling it for a while."""

    def __init__(self, provider: str, retry_after_seconds: float) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__(provider, "circuit open", retryable=True)


class WebhookRejectedError(Exception):
    """A webhook whose signature, secret or timestamp does not check out, or whose body
    cannot be parsed. Nothing is stored or changed for it."""


@runtime_checkable
class PaymentProvider(Protocol):
    """What the payments domain needs of a provider."""

    #: The path segment of its webhook URL and the value stored on payments.
    name: str
    #: Whether asking twice for the same refund (same ``RefundRequest.reference``) pays
    #: once. When False, Soko records that it is asking before each refund call, and a
    #: refund whose job died during the call is left to a person instead of retried.
    refunds_are_idempotent: bool

    async def start(self, payment: PaymentStart) -> StartedPayment: ...

    def verify_webhook(
        self, headers: Mapping[str, str], raw_body: bytes, now: dt.datetime
    ) -> InboundEvent:
        """Check the webhook on the raw bytes (never re-serialised JSON) in constant
        time, then parse it. Raises :class:`WebhookRejectedError`. ``headers`` keys are
        lower case."""
        ...

    async def fetch(self, provider_payment_id: str, reference: str) -> PaymentState: ...

    async def refund(self, refund: RefundRequest) -> RefundResult: ...

    def readiness(self) -> Mapping[str, object]:
        """For ``/ready``: at least ``{"status": "up"|"down", "circuit": "closed"|...}``;
        never calls the provider."""
        ...


@runtime_checkable
class RefundStatusReader(Protocol):
    """A provider that tells a refund's current state by its own refund id (Stripe,
    Paystack and Flutterwave all can).

    A refund the provider answered ``pending`` is followed up with
    :meth:`refund_status`, never by calling :meth:`PaymentProvider.refund` again: only
    some providers recognise a repeated refund request (Stripe, through its idempotency
    key, for 24 hours); Paystack and Flutterwave would refund a second time."""

    async def refund_status(
        self, provider_refund_id: str, refund: RefundRequest
    ) -> RefundResult: ...
