"""Payments: providers, verified webhooks, refunds, payouts and a double-entry ledger."""
