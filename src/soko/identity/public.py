"""What other domains may use of identity: frozen facts, never ORM rows."""

from __future__ import annotations

from soko.identity.audit import record_audit_event
from soko.identity.principals import authenticate
from soko.platform.config import Settings

__all__ = ["authenticate", "configuration_problems", "record_audit_event"]


def configuration_problems(settings: Settings) -> list[str]:
    """Problems with the identity settings the platform cannot check by itself."""
    from soko.identity.oidc import parse_oidc_providers

    raw = settings.oidc_providers.get_secret_value()
    if not raw.strip():
        return []
    try:
        parse_oidc_providers(raw, allow_http=not settings.is_production)
    except ValueError as exc:
        return [f"SOKO_OIDC_PROVIDERS: {line}" for line in str(exc).splitlines() if line]
    return []
