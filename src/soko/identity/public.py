"""What other domains may use of identity: frozen facts, never ORM rows."""

from __future__ import annotations

from soko.identity.audit import record_audit_event
from soko.identity.principals import authenticate

__all__ = ["authenticate", "record_audit_event"]
