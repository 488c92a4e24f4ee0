"""Notifications over HTTP: providers' delivery reports, a user's in-app notifications
and preferences, and the administrators' templates."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import select

from soko.identity.public import ACCOUNT_SELF, IDENTITY_SETTINGS
from soko.notifications import inbox
from soko.notifications.callbacks import (
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    TWILIO_SIGNATURE_HEADER,
    Report,
    parse_africastalking,
    parse_sendgrid,
    parse_twilio,
    sendgrid_signature_valid,
    token_valid,
    twilio_signature_valid,
)
from soko.notifications.channels import callback_url
from soko.notifications.deliveries import apply_report
from soko.notifications.errors import CallbackUnverified, PreferenceLocked, TemplateInvalid
from soko.notifications.messages import NotificationKind
from soko.notifications.models import InboxNotification, RecipientLocale, TemplateOverride
from soko.notifications.preferences import (
    LOCKED,
    Category,
    ChannelName,
    preferences_of,
    set_locale,
    set_preferences,
)
from soko.notifications.templates import (
    LOCALES,
    SOURCE_MAX_LENGTH,
    TemplateProblem,
    bundled_source,
    effective_source,
    override_key,
    overrides_changed,
    render_source,
    sms_segments,
    store_override,
    template_names,
)
from soko.notifications.triggers import template_sample_context
from soko.platform.auth import Principal, public, require
from soko.platform.errors import (
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
    json_pointer,
    problem_responses,
)
from soko.platform.http import register_callback_prefix
from soko.platform.pagination import Keyset, Page, PageRequestDep
from soko.platform.runtime import RuntimeDep, SessionDep

# Admins only: editing the messages the marketplace sends is configuring the marketplace.
TEMPLATES_PERMISSION = IDENTITY_SETTINGS

CALLBACK_BODY_MAX_BYTES = 1_000_000

router = APIRouter()
# Delivery reports come from a provider, with whatever Accept header it sends.
register_callback_prefix("/api/v1/notifications/callbacks/")
Me = Annotated[Principal, require(ACCOUNT_SELF)]
Admin = Annotated[Principal, require(TEMPLATES_PERMISSION)]
Anyone = Annotated[Principal | None, public()]


# -- provider delivery reports -----------------------------------------------------------------


def _form_pairs(body: bytes) -> list[tuple[str, str]] | None:
    """The pairs of a form body; None when it is not one (no signature can match it)."""
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None


def _unreadable(message: str) -> ValidationFailed:
    return ValidationFailed(
        f"The report {message}.",
        errors=[
            {
                "in": "body",
                "field": "",
                "pointer": json_pointer([]),
                "detail": message,
                "code": "invalid",
            }
        ],
    )


@router.post(
    "/notifications/callbacks/{provider}",
    status_code=204,
    tags=["notifications"],
    summary="A provider's delivery report (Twilio, SendGrid, Africa's Talking)",
    responses=problem_responses(401, 404, 413, 422),
)
async def provider_callback(
    provider: str,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    _caller: Anyone,
) -> Response:
    settings = runtime.settings
    body = await request.body()
    if len(body) > CALLBACK_BODY_MAX_BYTES:
        raise PayloadTooLarge(f"A delivery report may be at most {CALLBACK_BODY_MAX_BYTES} bytes.")
    reports: list[Report] = []
    if provider == "twilio":
        pairs = _form_pairs(body)
        url = callback_url(settings, "twilio")
        if request.url.query:
            url += "?" + request.url.query
        # Twilio signs the form's pairs: a body that is no form is not Twilio's.
        if pairs is None or not twilio_signature_valid(
            url,
            pairs,
            settings.twilio_auth_token.get_secret_value(),
            request.headers.get(TWILIO_SIGNATURE_HEADER),
        ):
            raise CallbackUnverified()
        report = parse_twilio(dict(pairs))
        reports = [report] if report else []
    elif provider == "sendgrid":
        if not sendgrid_signature_valid(
            settings.sendgrid_webhook_public_key.get_secret_value(),
            body,
            request.headers.get(SENDGRID_SIGNATURE_HEADER),
            request.headers.get(SENDGRID_TIMESTAMP_HEADER),
        ):
            raise CallbackUnverified()
        try:
            reports = parse_sendgrid(json.loads(body))
        except ValueError:
            raise _unreadable("is not a JSON array of events") from None
    elif provider == "africastalking":
        if not token_valid(
            settings.notifications_callback_token.get_secret_value(),
            request.query_params.get("token"),
        ):
            raise CallbackUnverified()
        pairs = _form_pairs(body)
        if pairs is None:
            raise _unreadable("is not a form")
        report = parse_africastalking(dict(pairs))
        reports = [report] if report else []
    else:
        raise NotFound()
    now = runtime.clock.now()
    for item in reports:
        await apply_report(
            session,
            delivery_id=item.delivery_id,
            kind=NotificationKind.email if provider == "sendgrid" else NotificationKind.sms,
            provider=provider,
            provider_message_id=item.provider_message_id,
            status=item.status,
            error=item.error,
            now=now,
        )
    return Response(status_code=204)


# -- in-app notifications ---------------------------------------------------------------------


class NotificationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    category: str
    title: str
    body: str
    link: str | None
    data: dict[str, Any]
    created_at: dt.datetime
    read_at: dt.datetime | None


class UnreadCount(BaseModel):
    unread: int


class MarkAllRead(BaseModel):
    model_config = ConfigDict(extra="forbid")

    up_to_id: uuid.UUID | None = Field(
        None, description="The newest notification the client showed: later ones stay unread."
    )
    before: AwareDatetime | None = Field(
        None, description="Only those created at or before this time (with its UTC offset)."
    )


class MarkedRead(BaseModel):
    marked: int


@router.get(
    "/me/notifications",
    response_model=Page[NotificationOut],
    tags=["notifications"],
    summary="My in-app notifications, newest first",
)
async def list_my_notifications(
    me: Me,
    session: SessionDep,
    page: PageRequestDep,
    unread: Annotated[bool, Query(description="Only those not read yet.")] = False,
) -> Page[NotificationOut]:
    listing = Keyset(
        f"notifications.inbox:{me.user_id}:{int(unread)}",
        id_column=InboxNotification.id,
        id_descending=True,
    )
    statement = select(InboxNotification).where(InboxNotification.user_id == me.user_id)
    if unread:
        statement = statement.where(InboxNotification.read_at.is_(None))
    rows, next_cursor = await listing.fetch(session, statement, page)
    return Page[NotificationOut](
        items=[NotificationOut.model_validate(row) for row in rows], next_cursor=next_cursor
    )


@router.get(
    "/me/notifications/unread-count",
    response_model=UnreadCount,
    tags=["notifications"],
    summary="How many of my in-app notifications are unread",
)
async def my_unread_count(me: Me, session: SessionDep) -> UnreadCount:
    return UnreadCount(unread=await inbox.unread_count(session, me.user_id))


@router.post(
    "/me/notifications/{notification_id}/read",
    status_code=204,
    tags=["notifications"],
    summary="Mark one of my notifications read",
    responses=problem_responses(404),
)
async def mark_my_notification_read(
    notification_id: uuid.UUID, me: Me, session: SessionDep, runtime: RuntimeDep
) -> Response:
    if not await inbox.mark_read(session, me.user_id, notification_id, runtime.clock.now()):
        raise NotFound()
    return Response(status_code=204)


@router.post(
    "/me/notifications/read",
    response_model=MarkedRead,
    tags=["notifications"],
    summary="Mark all my notifications read (up to an id or a time)",
)
async def mark_my_notifications_read(
    body: MarkAllRead, me: Me, session: SessionDep, runtime: RuntimeDep
) -> MarkedRead:
    marked = await inbox.mark_all_read(
        session, me.user_id, runtime.clock.now(), up_to_id=body.up_to_id, before=body.before
    )
    return MarkedRead(marked=marked)


# -- preferences -----------------------------------------------------------------------------


class ChannelChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: bool = True
    sms: bool = True
    in_app: bool = True


class CategoryPreferences(BaseModel):
    channels: ChannelChoice
    can_switch_off: bool


class PreferencesOut(BaseModel):
    locale: str
    categories: dict[Category, CategoryPreferences]


class PreferencesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    locale: str | None = Field(None, pattern=r"^(en|sw)$")
    categories: dict[Category, ChannelChoice] = Field(default_factory=dict)


async def _preferences_out(session: Any, runtime: Any, user_id: uuid.UUID) -> PreferencesOut:
    chosen = await preferences_of(session, user_id)
    locale = await session.scalar(
        select(RecipientLocale.locale).where(RecipientLocale.user_id == user_id)
    )
    return PreferencesOut(
        locale=locale or runtime.settings.notifications_default_locale,
        categories={
            category: CategoryPreferences(
                channels=ChannelChoice(
                    email=ChannelName.email in channels,
                    sms=ChannelName.sms in channels,
                    in_app=ChannelName.in_app in channels,
                ),
                can_switch_off=category not in LOCKED,
            )
            for category, channels in chosen.items()
        },
    )


@router.get(
    "/me/notification-preferences",
    response_model=PreferencesOut,
    tags=["notifications"],
    summary="My channels per category of messages, and my messages' language",
)
async def get_my_preferences(me: Me, session: SessionDep, runtime: RuntimeDep) -> PreferencesOut:
    return await _preferences_out(session, runtime, me.user_id)


@router.put(
    "/me/notification-preferences",
    response_model=PreferencesOut,
    tags=["notifications"],
    summary="Choose my channels per category (security and transactional stay on)",
    responses=problem_responses(422),
)
async def put_my_preferences(
    body: PreferencesIn, me: Me, session: SessionDep, runtime: RuntimeDep
) -> PreferencesOut:
    for category, choice in body.categories.items():
        if category in LOCKED and not (choice.email and choice.sms and choice.in_app):
            raise PreferenceLocked(
                f"{category.value} messages cannot be switched off.", category=category.value
            )
    await set_preferences(
        session,
        me.user_id,
        {
            category: {
                ChannelName.email: choice.email,
                ChannelName.sms: choice.sms,
                ChannelName.in_app: choice.in_app,
            }
            for category, choice in body.categories.items()
        },
    )
    if body.locale is not None:
        await set_locale(session, me.user_id, body.locale)
    return await _preferences_out(session, runtime, me.user_id)


# -- templates (administrators) ---------------------------------------------------------------


class TemplateSummary(BaseModel):
    name: str
    locale: str
    overridden: bool
    version: int | None


class TemplateOut(BaseModel):
    name: str
    locale: str
    source: str
    default_source: str | None
    overridden: bool
    version: int | None


class TemplateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=SOURCE_MAX_LENGTH)


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, min_length=1, max_length=SOURCE_MAX_LENGTH)
    data: dict[str, Any] | None = Field(
        None, description="Names to use instead of the sample data's, merged over it."
    )


class SmsInfo(BaseModel):
    text: str
    encoding: str
    units: int
    segments: int


class PreviewOut(BaseModel):
    subject: str
    title: str
    text: str
    html: str
    sms: SmsInfo | None


TemplateName = Annotated[str, Path(max_length=80, pattern=r"^[a-z][a-z._]*$")]
Locale = Annotated[str, Path(pattern=r"^(en|sw)$")]


def _known(name: str) -> None:
    if bundled_source(name, "en") is None:
        raise NotFound()


def _invalid(problem: TemplateProblem) -> TemplateInvalid:
    # Field errors as every 422 lists them (in, field, pointer, detail, code), each
    # also naming the template's part it found wrong.
    errors = [
        {
            "in": "body",
            "field": "source",
            "pointer": json_pointer(["source"]),
            "detail": f"{error['part']}: {error['message']}",
            "code": "template_invalid",
            "part": error["part"],
        }
        for error in problem.errors
    ]
    return TemplateInvalid(str(problem), errors=errors)


@router.get(
    "/admin/notifications/templates",
    response_model=list[TemplateSummary],
    tags=["notifications", "admin"],
    summary="Every message template, per locale",
)
async def list_templates(_admin: Admin, session: SessionDep) -> list[TemplateSummary]:
    overrides = {
        row.key: row.version for row in (await session.scalars(select(TemplateOverride))).all()
    }
    return [
        TemplateSummary(
            name=name,
            locale=locale,
            overridden=override_key(name, locale) in overrides,
            version=overrides.get(override_key(name, locale)),
        )
        for name in template_names()
        for locale in LOCALES
    ]


async def _template_out(session: Any, name: str, locale: str) -> TemplateOut:
    row = await session.get(TemplateOverride, override_key(name, locale))
    source = await effective_source(session, name, locale)
    return TemplateOut(
        name=name,
        locale=locale,
        source=source or "",
        default_source=bundled_source(name, locale),
        overridden=row is not None,
        version=row.version if row is not None else None,
    )


@router.get(
    "/admin/notifications/templates/{name}/{locale}",
    response_model=TemplateOut,
    tags=["notifications", "admin"],
    summary="One template's source in one locale",
    responses=problem_responses(404),
)
async def get_template(
    name: TemplateName, locale: Locale, _admin: Admin, session: SessionDep
) -> TemplateOut:
    _known(name)
    return await _template_out(session, name, locale)


@router.put(
    "/admin/notifications/templates/{name}/{locale}",
    response_model=TemplateOut,
    tags=["notifications", "admin"],
    summary="Replace a template (it must compile and render with the sample data)",
    responses=problem_responses(404, 422),
)
async def put_template(
    name: TemplateName,
    locale: Locale,
    body: TemplateIn,
    admin: Admin,
    session: SessionDep,
    runtime: RuntimeDep,
) -> TemplateOut:
    _known(name)
    try:
        # With the names this template's message has: one naming `order` in a store's
        # approval would fail at every sending and fall back to the bundled text.
        render_source(body.source, template_sample_context(name))
    except TemplateProblem as problem:
        raise _invalid(problem) from None
    await store_override(
        session, override_key(name, locale), body.source, admin.user_id, runtime.clock.now()
    )
    overrides_changed(session)
    return await _template_out(session, name, locale)


@router.delete(
    "/admin/notifications/templates/{name}/{locale}",
    response_model=TemplateOut,
    tags=["notifications", "admin"],
    summary="Go back to the bundled template",
    responses=problem_responses(404),
)
async def reset_template(
    name: TemplateName, locale: Locale, _admin: Admin, session: SessionDep
) -> TemplateOut:
    _known(name)
    row = await session.get(TemplateOverride, override_key(name, locale))
    if row is not None:
        await session.delete(row)
        await session.flush()
        overrides_changed(session)
    return await _template_out(session, name, locale)


def _merged(sample: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(sample)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


@router.post(
    "/admin/notifications/templates/{name}/{locale}/preview",
    response_model=PreviewOut,
    tags=["notifications", "admin"],
    summary="Render a template (stored, or the source sent) with sample data",
    responses=problem_responses(404, 422),
)
async def preview_template(
    name: TemplateName, locale: Locale, body: PreviewIn, _admin: Admin, session: SessionDep
) -> PreviewOut:
    _known(name)
    source = body.source or await effective_source(session, name, locale) or ""
    context = _merged(template_sample_context(name), body.data or {})
    try:
        rendered = render_source(source, context)
    except TemplateProblem as problem:
        raise _invalid(problem) from None
    sms = None
    if rendered.sms is not None:
        length = sms_segments(rendered.sms)
        sms = SmsInfo(
            text=rendered.sms,
            encoding=length.encoding,
            units=length.units,
            segments=length.segments,
        )
    return PreviewOut(
        subject=rendered.subject,
        title=rendered.title,
        text=rendered.text,
        html=rendered.html,
        sms=sms,
    )
