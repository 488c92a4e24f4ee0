"""The enabled payment providers of a runtime, built once from settings.

:func:`providers_of` is the one way the payments domain reaches the adapters. The first
call builds every provider named in ``settings.payment_providers`` and keeps them in
``runtime.extensions["payments.providers"]``; it also registers a ``/ready`` check per
provider (``payments.<name>``: its circuit breaker, never a network call) and closes the
providers' HTTP clients when the runtime stops.

Tests (and the demo) route every provider's HTTP through
``runtime.extensions["payments.transport"]`` (an ``httpx2`` transport such as
``MockTransport``) when it is set before the first call.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import httpx2

from soko.payments.providers.base import PaymentProvider
from soko.platform.runtime import Runtime

PROVIDERS_KEY = "payments.providers"
TRANSPORT_KEY = "payments.transport"


class ProviderConfigurationError(RuntimeError):
    """An enabled provider cannot be built (its credentials are missing)."""


def providers_of(runtime: Runtime) -> Mapping[str, PaymentProvider]:
    """The enabled providers by name, in the order settings list them."""
    cached: Mapping[str, PaymentProvider] | None = runtime.extensions.get(PROVIDERS_KEY)
    if cached is not None:
        return cached
    providers = build_providers(runtime)
    # providers_of is synchronous: nothing can interleave between the check above and
    # this store, so one runtime never builds two sets of clients.
    frozen: Mapping[str, PaymentProvider] = MappingProxyType(providers)
    runtime.extensions[PROVIDERS_KEY] = frozen
    for name, provider in providers.items():
        runtime.readiness_checks[f"payments.{name}"] = provider.readiness

    async def close_providers() -> None:
        for provider in providers.values():
            closer = getattr(provider, "aclose", None)
            if closer is not None:
                await closer()

    runtime.on_stop(close_providers)
    return frozen


def build_providers(runtime: Runtime) -> dict[str, PaymentProvider]:
    """A fresh set of the enabled providers (callers want :func:`providers_of`)."""
    settings = runtime.settings
    problems = settings.payment_credential_problems()
    if problems:
        raise ProviderConfigurationError("; ".join(problems))
    transport: Any = runtime.extensions.get(TRANSPORT_KEY)
    if transport is not None and not isinstance(transport, httpx2.AsyncBaseTransport):
        raise ProviderConfigurationError(
            f"runtime.extensions[{TRANSPORT_KEY!r}] must be an httpx2 async transport"
        )
    providers: dict[str, PaymentProvider] = {}
    for name in settings.payment_providers:
        providers[name] = _build(name, runtime, transport)
    return providers


def _build(
    name: str, runtime: Runtime, transport: httpx2.AsyncBaseTransport | None
) -> PaymentProvider:
    # Imported here: each adapter is loaded only when enabled, and this module imports
    # cleanly whatever adapters exist.
    settings, clock = runtime.settings, runtime.clock
    if name == "sandbox":
        from soko.payments.providers.sandbox import SandboxProvider

        sandbox: PaymentProvider = SandboxProvider(runtime)
        return sandbox
    if name == "stripe":
        from soko.payments.providers.stripe import StripeProvider

        return StripeProvider.from_settings(settings, clock=clock, transport=transport)
    if name == "paystack":
        from soko.payments.providers.paystack import PaystackProvider

        return PaystackProvider.from_settings(settings, clock=clock, transport=transport)
    if name == "flutterwave":
        from soko.payments.providers.flutterwave import FlutterwaveProvider

        return FlutterwaveProvider.from_settings(settings, clock=clock, transport=transport)
    raise ProviderConfigurationError(f"unknown payment provider {name!r}")
