"""Inbound payment webhooks (``/api/v1/payments/webhooks/{provider}``): called by the
providers, so no sign-in; the provider's signature on the raw body is the credential."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Request

from soko.payments import intake, service
from soko.payments.errors import PaymentWebhookRejected
from soko.payments.providers.base import WebhookRejectedError
from soko.payments.schemas import WebhookReceivedOut
from soko.platform.auth import Principal, public
from soko.platform.errors import NotFound, PayloadTooLarge, problem_responses
from soko.platform.http import register_raw_body_prefix
from soko.platform.runtime import RuntimeDep, SessionDep

log = structlog.get_logger("soko.payments")

router = APIRouter()
# The provider's signature covers the body as sent: it is taken whole, never refused for
# what its strings hold before the signature is checked.
register_raw_body_prefix("/api/v1/payments/webhooks/")


async def read_capped(request: Request, limit: int) -> bytes:
    """The raw body, refused past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"A payment webhook body may be at most {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"A payment webhook body may be at most {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/payments/webhooks/{provider}",
    response_model=WebhookReceivedOut,
    summary="A payment provider's webhook",
    responses=problem_responses(400, 404, 413),
)
async def receive_webhook(
    _caller: Annotated[Principal | None, public()],
    provider: str,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
) -> WebhookReceivedOut:
    """Verify the webhook's signature on the raw body, store it once under the
    provider's event id, and queue its processing. A duplicate answers
    ``duplicate: true`` and has no second effect."""
    adapter = service.provider_named(runtime, provider)
    if adapter is None:
        raise NotFound("No such payment provider.")
    raw_body = await read_capped(request, intake.MAX_BODY_BYTES)
    headers = {name.lower(): value for name, value in request.headers.items()}
    try:
        event = adapter.verify_webhook(headers, raw_body, runtime.clock.now())
    except WebhookRejectedError as exc:
        intake.count_rejected(provider)
        log.warning("payment webhook rejected", provider=provider, why=str(exc)[:200])
        raise PaymentWebhookRejected() from None
    if event.provider != adapter.name:
        intake.count_rejected(provider)
        raise PaymentWebhookRejected()
    received = await intake.store_event(session, runtime, event, raw_body, headers)
    return WebhookReceivedOut(received=True, duplicate=received.duplicate)
