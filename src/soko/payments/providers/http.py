"""Outbound HTTP for the payment providers: one client per provider, timeouts, retries
on safe operations only, a circuit breaker, error classification and metrics.

Every call ends within ``payment_http_timeout_seconds`` per attempt: besides httpx's
own timeouts (which bound each phase of an exchange, not its whole), each attempt runs
under an ``asyncio`` deadline, so a provider that trickles bytes or never answers cannot
hold a request or a job for longer.

Retries (with exponential backoff and jitter, through ``stamina``) happen only where a
repeat cannot move money twice: reads (``GET``) and ``POST`` calls carrying an
idempotency key the provider honours (Stripe's ``Idempotency-Key``). A ``POST`` without
one is sent once. Its failures are classified by what the provider may have done:

* it was refused before anything happened (the connection could not be opened, the
  pool had no room, 429 Too Many Requests, 503 Service Unavailable):
  ``retryable=True``;
* it was sent and no answer came back (a read timeout, a dropped connection, the
  deadline), or the provider failed mid-way (500, or a 502/504 from a gateway that
  gave up waiting on it): the provider may have acted on it,
  so repeating it blindly could charge or refund twice: ``retryable=False``, with a
  message saying so. Whoever called decides (refunds are flagged for an admin, a start
  is simply tried again under a new reference).

Every attempt goes through the provider's :class:`~soko.platform.breaker.CircuitBreaker`.
Timeouts, connection errors, 5xx and 429 count as the provider's failures; a 4xx is an
answer (the provider works). While the breaker is open calls fail at once with
:class:`~soko.payments.providers.base.ProviderUnavailableError`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2
import stamina
import structlog
from prometheus_client import Counter, Histogram

from soko.payments.providers.base import ProviderError, ProviderUnavailableError
from soko.platform.admission import working_elsewhere
from soko.platform.breaker import CircuitBreaker, CircuitOpenError
from soko.platform.clock import Clock
from soko.platform.config import PROVIDER_RETRY_AFTER_MAX_SECONDS, Settings

log = structlog.get_logger("soko.payments.providers")

PROVIDER_REQUESTS = Counter(
    "soko_payment_provider_requests_total",
    "Attempts of calls to payment providers, by provider, operation and outcome",
    ["provider", "operation", "outcome"],
)
PROVIDER_LATENCY = Histogram(
    "soko_payment_provider_request_duration_seconds",
    "Time one attempt of a call to a payment provider took, answered or not",
    ["provider", "operation"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
PROVIDER_RETRIES = Counter(
    "soko_payment_provider_retries_total",
    "Repeated attempts of safe calls to payment providers",
    ["provider", "operation"],
)

# Outcomes (a closed set: the label never carries provider text).
OK = "ok"
CLIENT_ERROR = "client_error"
SERVER_ERROR = "server_error"
RATE_LIMITED = "rate_limited"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
BAD_RESPONSE = "bad_response"
CIRCUIT_OPEN = "circuit_open"
CANCELLED = "cancelled"

SAFE_METHODS = frozenset({"GET", "HEAD"})
# Answers saying the request was turned away before the provider acted on it. A 502 or
# 504 is not among them: the gateway gave up, but the service behind it may have acted.
_REFUSED_STATUSES = frozenset({503})
_MESSAGE_LIMIT = 200


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    """Timeouts, retries and breaker limits, from settings."""

    timeout_seconds: float = 10.0
    attempts: int = 3
    breaker_failures: int = 5
    breaker_reset_seconds: float = 30.0
    wait_initial_seconds: float = 0.2
    wait_max_seconds: float = 2.0
    wait_jitter_seconds: float = 0.3

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpPolicy:
        return cls(
            timeout_seconds=settings.payment_http_timeout_seconds,
            attempts=settings.payment_http_retries,
            breaker_failures=settings.payment_breaker_failures,
            breaker_reset_seconds=settings.payment_breaker_reset_seconds,
        )


class ProviderHttpError(ProviderError):
    """A failed call, with what the HTTP exchange said about it.

    ``status_code`` is the provider's HTTP status (``None`` when no answer came);
    ``outage`` whether it counts against the provider's breaker;
    ``retry_after_seconds`` the provider's ``Retry-After``, when it sent one."""

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        retryable: bool,
        status_code: int | None = None,
        outage: bool = False,
        outcome: str = BAD_RESPONSE,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(provider, message, retryable=retryable)
        self.status_code = status_code
        self.outage = outage
        self.outcome = outcome
        self.retry_after_seconds = retry_after_seconds


def _counts_against_provider(exc: BaseException) -> bool:
    return isinstance(exc, ProviderHttpError) and exc.outage


class ProviderHttp:
    """One provider's HTTP client, breaker and policy. Close it with :meth:`aclose`."""

    def __init__(
        self,
        provider: str,
        *,
        base_url: str,
        headers: Mapping[str, str],
        policy: HttpPolicy,
        clock: Clock,
        transport: httpx2.AsyncBaseTransport | None = None,
        idempotency_header: str | None = None,
        retry_hint_header: str | None = None,
    ) -> None:
        """``idempotency_header``: the header carrying an idempotency key, for a
        provider that honours one (requests with a key are then retried).
        ``retry_hint_header``: a header by which the provider says whether repeating a
        failed request makes sense ("true"/"false"), e.g. ``Stripe-Should-Retry``."""
        self.provider = provider
        self.policy = policy
        self.idempotency_header = idempotency_header
        self.retry_hint_header = retry_hint_header
        self.breaker = CircuitBreaker(
            f"payments.{provider}",
            failure_threshold=policy.breaker_failures,
            reset_seconds=policy.breaker_reset_seconds,
            clock=clock,
        )
        self.client = httpx2.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Accept": "application/json", **headers},
            timeout=httpx2.Timeout(policy.timeout_seconds),
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def readiness(self) -> dict[str, object]:
        """For ``/ready``: the breaker's state, never a network call. ``critical`` is
        false: a payment provider's outage must not take the whole service out of
        rotation (browsing, carts and every other provider still work)."""
        facts = self.breaker.snapshot()
        down = facts["circuit"] == "open"
        return {"status": "down" if down else "up", "critical": False, **facts}

    async def request(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Mapping[str, Any] | None = None,
        form: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Call the provider and answer its JSON object (floats parsed as
        :class:`~decimal.Decimal`). Raises :class:`ProviderError` (a
        :class:`ProviderHttpError`) or :class:`ProviderUnavailableError`.

        ``operation`` names the call in metrics ("create_intent", "verify"...)."""
        method = method.upper()
        headers: dict[str, str] = {}
        if idempotency_key is not None:
            if self.idempotency_header is None:
                raise ValueError(f"{self.provider} honours no idempotency key")
            headers[self.idempotency_header] = idempotency_key
        safe = method in SAFE_METHODS or idempotency_key is not None
        exchange = _Exchange(
            operation=operation,
            method=method,
            path=path,
            params=dict(params) if params is not None else None,
            json_body=dict(json_body) if json_body is not None else None,
            form=dict(form) if form is not None else None,
            headers=headers,
            safe=safe,
        )
        if not safe:
            return await self._attempt(exchange)
        async for attempt in stamina.retry_context(
            on=_retry_hook,
            attempts=self.policy.attempts,
            # No new attempt starts once this much time has gone since the first.
            timeout=self.policy.timeout_seconds,
            wait_initial=self.policy.wait_initial_seconds,
            wait_max=self.policy.wait_max_seconds,
            wait_jitter=self.policy.wait_jitter_seconds,
        ):
            with attempt:
                if attempt.num > 1:
                    PROVIDER_RETRIES.labels(self.provider, operation).inc()
                return await self._attempt(exchange)
        raise AssertionError("unreachable: stamina re-raises the last failure")

    async def _attempt(self, exchange: _Exchange) -> dict[str, Any]:
        try:
            return await self.breaker.call(
                lambda: self._exchange(exchange), counts_as_failure=_counts_against_provider
            )
        except CircuitOpenError as exc:
            PROVIDER_REQUESTS.labels(self.provider, exchange.operation, CIRCUIT_OPEN).inc()
            raise ProviderUnavailableError(self.provider, exc.retry_after_seconds) from None

    async def _exchange(self, exchange: _Exchange) -> dict[str, Any]:
        began = time.perf_counter()
        # Stays so only if the attempt is cancelled from outside (its caller went away).
        outcome = CANCELLED
        try:
            try:
                # The request's place among those its process works on goes to
                # another while the provider answers.
                async with working_elsewhere(), asyncio.timeout(self.policy.timeout_seconds):
                    response = await self.client.request(
                        exchange.method,
                        exchange.path,
                        params=exchange.params,
                        json=exchange.json_body,
                        data=exchange.form,
                        headers=exchange.headers,
                    )
            except (TimeoutError, httpx2.TimeoutException) as exc:
                raise self._no_answer(exchange, exc, TIMEOUT) from None
            except httpx2.TransportError as exc:
                raise self._no_answer(exchange, exc, CONNECTION_ERROR) from None
            except httpx2.RequestError as exc:
                # An answer came but could not be read (a broken encoding, a redirect
                # loop): the provider, or something in front of it, is misbehaving.
                raise ProviderHttpError(
                    self.provider,
                    f"{exchange.operation}: the answer could not be read ({type(exc).__name__})",
                    retryable=exchange.safe,
                    outage=True,
                    outcome=BAD_RESPONSE,
                ) from None
            answer = self._classify(exchange, response)
            outcome = OK
            return answer
        except ProviderHttpError as exc:
            outcome = exc.outcome
            log.warning(
                "payment provider call failed",
                provider=self.provider,
                operation=exchange.operation,
                outcome=outcome,
                status_code=exc.status_code,
                retryable=exc.retryable,
            )
            raise
        finally:
            PROVIDER_REQUESTS.labels(self.provider, exchange.operation, outcome).inc()
            PROVIDER_LATENCY.labels(self.provider, exchange.operation).observe(
                time.perf_counter() - began
            )

    def _no_answer(
        self, exchange: _Exchange, exc: BaseException, outcome: str
    ) -> ProviderHttpError:
        # The request never left (nothing to connect to, no pooled connection free):
        # repeating it is safe even for a POST.
        never_sent = isinstance(
            exc, httpx2.ConnectError | httpx2.ConnectTimeout | httpx2.PoolTimeout
        )
        what = "timed out" if outcome == TIMEOUT else "could not be reached"
        if exchange.safe or never_sent:
            return ProviderHttpError(
                self.provider,
                f"{exchange.operation} {what} ({type(exc).__name__})",
                retryable=True,
                outage=True,
                outcome=outcome,
            )
        return ProviderHttpError(
            self.provider,
            f"{exchange.operation} {what} after the request was sent; the provider may "
            "have acted on it, so check its state before repeating it",
            retryable=False,
            outage=True,
            outcome=outcome,
        )

    def _classify(self, exchange: _Exchange, response: httpx2.Response) -> dict[str, Any]:
        status = response.status_code
        body = _json_object(response.content)
        if 200 <= status < 300:
            if body is None:
                raise ProviderHttpError(
                    self.provider,
                    f"{exchange.operation}: the provider's answer is not a JSON object",
                    retryable=exchange.safe,
                    status_code=status,
                    outage=True,
                    outcome=BAD_RESPONSE,
                )
            return body
        message = f"{exchange.operation} answered HTTP {status}"
        detail = _provider_message(body)
        if detail:
            message = f"{message}: {detail}"
        hint = (
            response.headers.get(self.retry_hint_header, "").strip().lower()
            if self.retry_hint_header
            else ""
        )
        if hint == "false":
            # The provider says a repeat would change nothing (its idempotency layer
            # would replay this very answer).
            raise self._error(
                message,
                retryable=False,
                status_code=status,
                outcome=SERVER_ERROR if status >= 500 else CLIENT_ERROR,
            )
        if exchange.safe and (status == 409 or hint == "true"):
            # 409 on a keyed request: the same key is still being processed (a timed
            # out attempt Stripe is finishing); the repeat gets its answer.
            raise self._error(
                message,
                retryable=True,
                status_code=status,
                outcome=SERVER_ERROR if status >= 500 else CLIENT_ERROR,
                retry_after=_retry_after_seconds(response),
            )
        if status == 429:
            raise self._error(
                message,
                retryable=True,
                status_code=status,
                outcome=RATE_LIMITED,
                retry_after=_retry_after_seconds(response),
            )
        if status >= 500:
            retryable = exchange.safe or status in _REFUSED_STATUSES
            if not retryable:
                message += "; the provider may have acted on it, so check before repeating"
            raise self._error(
                message,
                retryable=retryable,
                status_code=status,
                outcome=SERVER_ERROR,
                retry_after=_retry_after_seconds(response),
            )
        raise self._error(message, retryable=False, status_code=status, outcome=CLIENT_ERROR)

    def _error(
        self,
        message: str,
        *,
        retryable: bool,
        status_code: int,
        outcome: str,
        retry_after: float | None = None,
    ) -> ProviderHttpError:
        return ProviderHttpError(
            self.provider,
            message,
            retryable=retryable,
            status_code=status_code,
            outage=outcome in (RATE_LIMITED, SERVER_ERROR),
            outcome=outcome,
            retry_after_seconds=retry_after,
        )


class HttpBackedProvider:
    """What every adapter that talks to its provider over :class:`ProviderHttp` shares:
    its client, closing it, and its circuit's state for ``/ready``."""

    _http: ProviderHttp

    @property
    def http(self) -> ProviderHttp:
        return self._http

    async def aclose(self) -> None:
        await self._http.aclose()

    def readiness(self) -> Mapping[str, object]:
        return self._http.readiness()


@dataclass(frozen=True, slots=True)
class _Exchange:
    operation: str
    method: str
    path: str
    params: dict[str, str] | None
    json_body: dict[str, Any] | None
    form: dict[str, str] | None
    headers: dict[str, str]
    safe: bool


def _retry_hook(exc: Exception) -> bool | float:
    """Stamina's decision: retry retryable failures (never an open circuit: the breaker
    has already said to wait), honouring a short ``Retry-After``."""
    if isinstance(exc, ProviderUnavailableError) or not isinstance(exc, ProviderError):
        return False
    if not exc.retryable:
        return False
    if isinstance(exc, ProviderHttpError) and exc.retry_after_seconds is not None:
        # Beyond the longest wait allowed inside one call (which the settings keep the
        # database's idle-in-transaction limit above), the caller's schedule takes over.
        if exc.retry_after_seconds > PROVIDER_RETRY_AFTER_MAX_SECONDS:
            return False
        return exc.retry_after_seconds
    return True


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(content, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _provider_message(body: Mapping[str, Any] | None) -> str:
    """The provider's own error text (Stripe's ``error.message``, Paystack's and
    Flutterwave's ``message``), shortened; never the request or its credentials."""
    if body is None:
        return ""
    error = body.get("error")
    text = error.get("message") if isinstance(error, Mapping) else body.get("message")
    if not isinstance(text, str):
        return ""
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"


def _retry_after_seconds(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(moment.timestamp() - time.time(), 0.0)


def unexpected_answer(provider: str, operation: str, what: str) -> ProviderHttpError:
    """A 2xx answer that lacks what the provider's API documents. Not retryable: the
    call was answered, so it may have taken effect; repeating it blindly is unsafe."""
    return ProviderHttpError(
        provider,
        f"{operation}: unexpected answer ({what})",
        retryable=False,
        outcome=BAD_RESPONSE,
    )
