"""The identity domain's jobs and event handlers, loaded by ``soko.app.load_handlers``."""

from __future__ import annotations

from soko.identity import key_rotation  # registers the identity.reencrypt job

__all__ = ["key_rotation"]
