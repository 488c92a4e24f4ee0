"""The sandbox provider's own tables: its charges and the refunds made against them.

These rows are the sandbox's side of a payment, the part a real provider keeps in its
own systems; Soko's payments never join them. A charge is opened by
:meth:`soko.payments.providers.sandbox.SandboxProvider.start` and decided once, by a
person on the hosted page (``/sandbox/pay/<token>``).

The page token is the capability to decide the charge: 256 random bits, given out once in
the page URL and stored only as its SHA-256 digest, so a database read does not hand out
working page links. The charge's own id (a UUID) is what Soko stores as the provider's
payment id; it opens nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey

REFERENCE_MAX_LENGTH = 100
RETURN_URL_MAX_LENGTH = 2000
TOKEN_HASH_LENGTH = 64  # SHA-256, hex


class ChargeStatus(StrEnum):
    pending = "pending"  # opened; nobody has chosen on the page yet
    succeeded = "succeeded"
    failed = "failed"
    abandoned = "abandoned"


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class SandboxCharge(UUIDPrimaryKey, Base):
    """One payment as the sandbox provider sees it."""

    __tablename__ = "payments_sandbox_charges"
    __table_args__ = (
        CheckConstraint(_in("status", ChargeStatus), name="status"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint(
            "refunded_minor >= 0 AND refunded_minor <= amount_minor", name="refunded_within_amount"
        ),
        # Only a captured charge can have refunds.
        CheckConstraint("refunded_minor = 0 OR status = 'succeeded'", name="refunds_need_capture"),
    )

    page_token_hash: Mapped[str] = mapped_column(String(TOKEN_HASH_LENGTH), unique=True)
    # Soko's payment reference: the provider-side idempotency key of a start, so a
    # retried start finds its charge instead of opening a second one.
    reference: Mapped[str] = mapped_column(String(REFERENCE_MAX_LENGTH), unique=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default=ChargeStatus.pending.value)
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    # Empty: the page shows its own result page instead of redirecting.
    return_url: Mapped[str] = mapped_column(String(RETURN_URL_MAX_LENGTH), default="")
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime]
    decided_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime]


class SandboxRefund(UUIDPrimaryKey, Base):
    """A refund made against a captured sandbox charge. Refunds succeed at once."""

    __tablename__ = "payments_sandbox_refunds"
    __table_args__ = (
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        # Soko's refund id: the idempotency key of a refund request.
        UniqueConstraint("charge_id", "reference"),
    )

    charge_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("payments_sandbox_charges.id", ondelete="CASCADE"), index=True
    )
    reference: Mapped[str] = mapped_column(String(REFERENCE_MAX_LENGTH))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    reason: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime]
