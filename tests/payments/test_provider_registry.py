"""The provider registry: built once per runtime from settings, readiness per provider,
clients closed on stop, every HTTP adapter through the runtime's transport when set."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import stamina

from soko.payments.providers.base import (
    PaymentProvider,
    ProviderError,
    ProviderUnavailableError,
)
from soko.payments.providers.flutterwave import FlutterwaveProvider
from soko.payments.providers.paystack import PaystackProvider
from soko.payments.providers.registry import (
    PROVIDERS_KEY,
    TRANSPORT_KEY,
    ProviderConfigurationError,
    providers_of,
)
from soko.payments.providers.stripe import StripeProvider
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.runtime import Runtime
from tests.conftest import make_settings

CREDENTIALS: dict[str, Any] = {
    "stripe_secret_key": "sk_test_registry",
    "stripe_webhook_secret": "whsec_registry",
    "paystack_secret_key": "sk_test_paystack_registry",
    "flutterwave_secret_key": "FLWSECK_TEST-registry-X",
    "flutterwave_secret_hash": "flw-registry-hash",
}


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


class Runtimes:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = ManualClock()
        self.made: list[Runtime] = []

    def __call__(self, **settings: Any) -> Runtime:
        runtime = Runtime(make_settings(self.tmp_path, **settings), clock=self.clock)
        self.made.append(runtime)
        return runtime


@pytest.fixture
async def runtimes(tmp_path: Path) -> AsyncIterator[Runtimes]:
    made = Runtimes(tmp_path)
    yield made
    for runtime in made.made:
        await runtime.stop()


async def test_builds_the_enabled_providers_once_in_settings_order(runtimes: Runtimes) -> None:
    runtime = runtimes(payment_providers="paystack,stripe,flutterwave", **CREDENTIALS)
    providers = providers_of(runtime)
    assert list(providers) == ["paystack", "stripe", "flutterwave"]
    assert isinstance(providers["paystack"], PaystackProvider)
    assert isinstance(providers["stripe"], StripeProvider)
    assert isinstance(providers["flutterwave"], FlutterwaveProvider)
    for name, provider in providers.items():
        assert isinstance(provider, PaymentProvider)
        assert provider.name == name
    assert providers_of(runtime) is providers
    assert runtime.extensions[PROVIDERS_KEY] is providers
    with pytest.raises(TypeError):
        providers["evil"] = providers["stripe"]  # type: ignore[index]


async def test_readiness_checks_report_each_providers_circuit(runtimes: Runtimes) -> None:
    runtime = runtimes(payment_providers="stripe,paystack", **CREDENTIALS)
    providers_of(runtime)
    assert set(runtime.readiness_checks) >= {"payments.stripe", "payments.paystack"}
    assert "payments.flutterwave" not in runtime.readiness_checks
    assert runtime.readiness_checks["payments.stripe"]() == {
        "status": "up",
        "critical": False,
        "circuit": "closed",
        "consecutive_failures": 0,
    }


async def test_the_runtime_transport_carries_every_adapters_http(runtimes: Runtimes) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(503)

    runtime = runtimes(
        payment_providers="stripe,paystack,flutterwave",
        stripe_api_base="https://stripe.internal.example",
        payment_http_retries=2,
        payment_breaker_failures=2,
        payment_breaker_reset_seconds=60,
        **CREDENTIALS,
    )
    runtime.extensions[TRANSPORT_KEY] = httpx2.MockTransport(handler)
    providers = providers_of(runtime)
    for provider in providers.values():
        # Two attempts (settings) fail and open the breaker (two failures)...
        with pytest.raises(ProviderError) as failed:
            await provider.fetch("4975363", "ref-1")
        assert failed.value.retryable is True
        assert not isinstance(failed.value, ProviderUnavailableError)
        # ...so the next call is refused without a request.
        with pytest.raises(ProviderUnavailableError):
            await provider.fetch("4975363", "ref-1")
    assert [r.url.host for r in seen] == [
        "stripe.internal.example",
        "stripe.internal.example",
        "api.paystack.co",
        "api.paystack.co",
        "api.flutterwave.com",
        "api.flutterwave.com",
    ]
    assert seen[0].headers["authorization"] == "Bearer sk_test_registry"
    assert seen[2].headers["authorization"] == "Bearer sk_test_paystack_registry"
    assert seen[4].headers["authorization"] == "Bearer FLWSECK_TEST-registry-X"
    state = runtime.readiness_checks["payments.paystack"]()
    assert state["status"] == "down"
    assert state["circuit"] == "open"
    assert state["retry_after_seconds"] == 60.0
    runtimes.clock.advance(dt.timedelta(seconds=60))
    assert runtime.readiness_checks["payments.paystack"]()["circuit"] == "half_open"


async def test_timeouts_come_from_settings(runtimes: Runtimes) -> None:
    runtime = runtimes(payment_providers="stripe", payment_http_timeout_seconds=3.5, **CREDENTIALS)
    stripe = providers_of(runtime)["stripe"]
    assert isinstance(stripe, StripeProvider)
    assert stripe.http.client.timeout.read == 3.5
    assert stripe.http.policy.timeout_seconds == 3.5


async def test_clients_are_closed_when_the_runtime_stops(tmp_path: Path) -> None:
    runtime = Runtime(
        make_settings(tmp_path, payment_providers="stripe,flutterwave", **CREDENTIALS),
        clock=ManualClock(),
    )
    providers = providers_of(runtime)
    clients = [p.http.client for p in providers.values()]  # type: ignore[attr-defined]
    assert not any(client.is_closed for client in clients)
    await runtime.stop()
    assert all(client.is_closed for client in clients)


@pytest.mark.parametrize(
    ("provider", "missing"),
    [
        ("stripe", "stripe_webhook_secret"),
        ("stripe", "stripe_secret_key"),
        ("paystack", "paystack_secret_key"),
        ("flutterwave", "flutterwave_secret_hash"),
    ],
)
async def test_an_enabled_provider_without_credentials_is_refused(
    runtimes: Runtimes, provider: str, missing: str
) -> None:
    credentials = {k: v for k, v in CREDENTIALS.items() if k != missing}
    runtime = runtimes(payment_providers=provider, **credentials)
    with pytest.raises(ProviderConfigurationError, match=f"SOKO_{missing.upper()}"):
        providers_of(runtime)
    assert PROVIDERS_KEY not in runtime.extensions


async def test_a_transport_of_the_wrong_kind_is_refused(runtimes: Runtimes) -> None:
    runtime = runtimes(payment_providers="stripe", **CREDENTIALS)
    runtime.extensions[TRANSPORT_KEY] = httpx2.MockTransport  # the class, not a transport
    with pytest.raises(ProviderConfigurationError, match="transport"):
        providers_of(runtime)


async def test_the_sandbox_is_the_default(runtimes: Runtimes) -> None:
    from soko.payments.providers.sandbox import SandboxProvider

    runtime = runtimes()
    providers = providers_of(runtime)
    assert list(providers) == ["sandbox"]
    assert isinstance(providers["sandbox"], SandboxProvider)
    assert isinstance(providers["sandbox"], PaymentProvider)
    assert "payments.sandbox" in runtime.readiness_checks


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(
        tmp_path,
        database_url=database_url,
        payment_providers="stripe,paystack",
        payment_breaker_failures=1,
        **CREDENTIALS,
    )


async def test_ready_shows_each_provider_and_an_open_circuit(
    runtime: Runtime, client: httpx2.AsyncClient
) -> None:
    runtime.extensions[TRANSPORT_KEY] = httpx2.MockTransport(lambda _: httpx2.Response(503))
    providers = providers_of(runtime)
    checks = (await client.get("/ready")).json()["checks"]
    assert checks["payments.stripe"]["status"] == "up"
    assert checks["payments.stripe"]["circuit"] == "closed"
    assert checks["payments.paystack"]["status"] == "up"

    with pytest.raises(ProviderError):
        await providers["paystack"].fetch("ref-1", "ref-1")
    checks = (await client.get("/ready")).json()["checks"]
    assert checks["payments.paystack"]["status"] == "down"
    assert checks["payments.paystack"]["circuit"] == "open"
    assert checks["payments.paystack"]["critical"] is False
    assert checks["payments.stripe"]["status"] == "up"
    # The database and the rest are unaffected.
    assert checks["database"]["status"] == "up"
