"""The payments domain's event handlers and jobs: processing inbound webhooks, refunds
and reconciliation (:mod:`.jobs`), and the sandbox provider's webhook deliveries
(:mod:`.sandbox_delivery`). Imported for their registrations."""

from __future__ import annotations

from soko.payments import jobs, sandbox_delivery

__all__ = ["jobs", "sandbox_delivery"]
