"""The payments domain's tables, declared in three modules: payments, webhook events and
refunds (:mod:`.payment_models`); the ledger, commission and payouts
(:mod:`.ledger_models`); and the sandbox provider's own charges (:mod:`.sandbox_models`).
Imported here so that loading the domain's models loads all of them."""

from __future__ import annotations

from soko.payments import ledger_models, payment_models, sandbox_models

__all__ = ["ledger_models", "payment_models", "sandbox_models"]
