"""``/api/v1/webhooks``: endpoints, their secrets, deliveries and the delivery log.

Whose endpoints a request manages: with ``X-Seller-Id`` (or as the member of a single
store), that store's, for its owners and managers; without ``X-Seller-Id``, an
administrator holding ``webhooks:manage`` manages the marketplace's own. Another owner's
endpoint answers 404, exactly like one that does not exist. Secrets appear in two
answers only, creation and rotation, which are never cached.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlalchemy import select

from soko.identity.public import WEBHOOKS_MANAGE
from soko.platform.auth import SESSION_ONLY, Principal, require
from soko.platform.errors import problem_responses
from soko.platform.pagination import Keyset, Page, PageRequestDep, SortKey
from soko.platform.runtime import RuntimeDep, SessionDep
from soko.sellers.public import SELLER_ID_HEADER, SellerRole, acting_seller, require_role
from soko.webhooks import service
from soko.webhooks.event_types import EVENT_TYPES
from soko.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from soko.webhooks.schemas import (
    AttemptOut,
    DeliveryOut,
    EndpointIn,
    EndpointOut,
    EndpointPatch,
    EndpointWithSecret,
    EventTypesOut,
    RedeliverFailedIn,
    RedeliverFailedOut,
)
from soko.webhooks.service import Scope

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

NO_STORE = {"Cache-Control": "no-store"}


async def _scope(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, require()],
    x_seller_id: Annotated[
        str | None,
        Header(
            alias=SELLER_ID_HEADER,
            max_length=64,
            description="The store whose endpoints these are; omit as an administrator "
            "to manage the marketplace's own endpoints.",
        ),
    ] = None,
) -> Scope:
    if not (x_seller_id or "").strip() and principal.can(WEBHOOKS_MANAGE):
        return Scope(seller_id=None, user_id=principal.user_id)
    acting = await acting_seller(request, session, principal)
    require_role(acting, SellerRole.manager)
    return Scope(seller_id=acting.seller_id, user_id=principal.user_id)


ScopeDep = Annotated[Scope, Depends(_scope)]


def _owner_key(scope: Scope) -> str:
    return str(scope.seller_id) if scope.seller_id else "marketplace"


@router.get("/event-types", response_model=EventTypesOut, summary="The event types to subscribe to")
async def list_event_types(principal: Annotated[Principal, require()]) -> EventTypesOut:
    del principal
    return EventTypesOut(event_types=list(EVENT_TYPES))


@router.get("/endpoints", response_model=Page[EndpointOut], summary="Your endpoints, newest first")
async def list_endpoints(
    scope: ScopeDep, session: SessionDep, runtime: RuntimeDep, page: PageRequestDep
) -> Page[EndpointOut]:
    keyset = Keyset(
        f"webhooks.endpoints:{_owner_key(scope)}",
        SortKey(WebhookEndpoint.created_at, descending=True),
        id_column=WebhookEndpoint.id,
    )
    rows, cursor = await keyset.fetch(session, service.endpoints_query(scope), page)
    now = runtime.clock.now()
    return Page[EndpointOut](items=[EndpointOut.of(row, now) for row in rows], next_cursor=cursor)


@router.post(
    "/endpoints",
    dependencies=[SESSION_ONLY],
    status_code=201,
    response_model=EndpointWithSecret,
    summary="Register an endpoint; its secret is shown this once",
    responses=problem_responses(409, 422),
)
async def create_endpoint(
    body: EndpointIn, scope: ScopeDep, session: SessionDep, runtime: RuntimeDep, response: Response
) -> EndpointWithSecret:
    endpoint, secret = await service.create_endpoint(
        session,
        runtime,
        scope,
        url=body.url,
        event_types=body.event_types,
        description=body.description,
    )
    response.headers.update(NO_STORE)
    response.headers["Location"] = f"/api/v1/webhooks/endpoints/{endpoint.id}"
    shown = EndpointOut.of(endpoint, runtime.clock.now())
    return EndpointWithSecret(**shown.model_dump(), secret=secret)


@router.get(
    "/endpoints/{endpoint_id}",
    response_model=EndpointOut,
    summary="One endpoint",
    responses=problem_responses(404),
)
async def read_endpoint(
    endpoint_id: uuid.UUID, scope: ScopeDep, session: SessionDep, runtime: RuntimeDep
) -> EndpointOut:
    endpoint = await service.endpoint_for(session, scope, endpoint_id)
    return EndpointOut.of(endpoint, runtime.clock.now())


@router.patch(
    "/endpoints/{endpoint_id}",
    dependencies=[SESSION_ONLY],
    response_model=EndpointOut,
    summary="Change the URL, the event types, the description, or enable/disable",
    responses=problem_responses(404, 422),
)
async def update_endpoint(
    endpoint_id: uuid.UUID,
    body: EndpointPatch,
    scope: ScopeDep,
    session: SessionDep,
    runtime: RuntimeDep,
) -> EndpointOut:
    endpoint = await service.endpoint_for(session, scope, endpoint_id, lock=True)
    await service.update_endpoint(
        session,
        runtime,
        endpoint,
        url=body.url,
        event_types=body.event_types,
        description=body.description,
        enabled=body.enabled,
    )
    return EndpointOut.of(endpoint, runtime.clock.now())


@router.delete(
    "/endpoints/{endpoint_id}",
    status_code=204,
    summary="Delete an endpoint with its deliveries and log",
    responses=problem_responses(404),
)
async def delete_endpoint(endpoint_id: uuid.UUID, scope: ScopeDep, session: SessionDep) -> Response:
    endpoint = await service.endpoint_for(session, scope, endpoint_id, lock=True)
    await service.delete_endpoint(session, endpoint)
    return Response(status_code=204)


@router.post(
    "/endpoints/{endpoint_id}/rotate-secret",
    response_model=EndpointWithSecret,
    summary="A new secret, shown once; the old one keeps signing during the overlap",
    responses=problem_responses(404),
)
async def rotate_secret(
    endpoint_id: uuid.UUID,
    scope: ScopeDep,
    session: SessionDep,
    runtime: RuntimeDep,
    response: Response,
) -> EndpointWithSecret:
    endpoint = await service.endpoint_for(session, scope, endpoint_id, lock=True)
    secret, _ = await service.rotate_secret(session, runtime, endpoint)
    response.headers.update(NO_STORE)
    shown = EndpointOut.of(endpoint, runtime.clock.now())
    return EndpointWithSecret(**shown.model_dump(), secret=secret)


@router.get(
    "/endpoints/{endpoint_id}/deliveries",
    response_model=Page[DeliveryOut],
    summary="The endpoint's deliveries (one per event), newest first",
    responses=problem_responses(404),
)
async def list_deliveries(
    endpoint_id: uuid.UUID,
    scope: ScopeDep,
    session: SessionDep,
    page: PageRequestDep,
    status: Annotated[DeliveryStatus | None, Query(description="Only in this state")] = None,
) -> Page[DeliveryOut]:
    endpoint = await service.endpoint_for(session, scope, endpoint_id)
    statement = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    if status is not None:
        statement = statement.where(WebhookDelivery.status == status.value)
    keyset = Keyset(
        f"webhooks.deliveries:{endpoint.id}:{status.value if status else ''}",
        SortKey(WebhookDelivery.created_at, descending=True),
        id_column=WebhookDelivery.id,
    )
    rows, cursor = await keyset.fetch(session, statement, page)
    return Page[DeliveryOut](items=[DeliveryOut.of(row) for row in rows], next_cursor=cursor)


@router.get(
    "/endpoints/{endpoint_id}/attempts",
    response_model=Page[AttemptOut],
    summary="The delivery log: every request made to the endpoint, newest first",
    responses=problem_responses(404),
)
async def list_attempts(
    endpoint_id: uuid.UUID, scope: ScopeDep, session: SessionDep, page: PageRequestDep
) -> Page[AttemptOut]:
    endpoint = await service.endpoint_for(session, scope, endpoint_id)
    keyset = Keyset(
        f"webhooks.attempts:{endpoint.id}",
        SortKey(WebhookAttempt.at, descending=True),
        id_column=WebhookAttempt.id,
    )
    statement = select(WebhookAttempt).where(WebhookAttempt.endpoint_id == endpoint.id)
    rows, cursor = await keyset.fetch(session, statement, page)
    return Page[AttemptOut](items=[AttemptOut.of(row) for row in rows], next_cursor=cursor)


@router.post(
    "/endpoints/{endpoint_id}/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=DeliveryOut,
    summary="Send one event again (same webhook-id)",
    responses=problem_responses(404, 409),
)
async def redeliver(
    endpoint_id: uuid.UUID,
    delivery_id: uuid.UUID,
    scope: ScopeDep,
    session: SessionDep,
    runtime: RuntimeDep,
) -> DeliveryOut:
    # The endpoint's row lock waits for an attempt in flight to finish.
    endpoint = await service.endpoint_for(session, scope, endpoint_id, lock=True)
    delivery = await service.redeliver(session, runtime, endpoint, delivery_id)
    return DeliveryOut.of(delivery)


@router.post(
    "/endpoints/{endpoint_id}/redeliver-failed",
    status_code=202,
    response_model=RedeliverFailedOut,
    summary="Send again every failed delivery of events since a time",
    responses=problem_responses(404, 409),
)
async def redeliver_failed(
    endpoint_id: uuid.UUID,
    body: RedeliverFailedIn,
    scope: ScopeDep,
    session: SessionDep,
    runtime: RuntimeDep,
) -> RedeliverFailedOut:
    endpoint = await service.endpoint_for(session, scope, endpoint_id, lock=True)
    count, more = await service.redeliver_failed_since(session, runtime, endpoint, body.since)
    return RedeliverFailedOut(requeued=count, more=more)
