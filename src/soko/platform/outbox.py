"""The outbox table: side effects written in the same transaction as the state change.

(Scaffolding: the tables are being written; see docs/architecture.md.)
"""
