"""Which domain events send which messages to whom: the one declared table.

Each :class:`Trigger` names an event, an audience (the order's buyer, the members of
the seller's store, the marketplace's admins), the template rendered for them, the
preference category and the channels it uses. :func:`notify` runs in the event
handler's transaction: it reads every recipient's contact (through
``soko.identity.public.contacts_of``) and locale, one query each however many there
are; then for each recipient it reads their preferences, renders the template, and
queues email, SMS and in-app notifications in that same transaction.
Each is keyed by the event's id, the template and the recipient, so a second delivery
of an event sends nothing twice.

Admins are reached at ``SOKO_NOTIFICATIONS_ADMIN_EMAIL`` (an operations mailbox) until
identity offers a way to list the users holding a role.

Identity's own messages (sign-in codes, email verification, password resets) are sent
by identity itself through :mod:`soko.notifications.public`, not from here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.events import NEW_DEVICE_SIGN_IN
from soko.identity.public import Contact, contacts_of, user_ids_with_role
from soko.notifications.inbox import add_to_inbox
from soko.notifications.models import RecipientLocale
from soko.notifications.preferences import Category, ChannelName, allowed_channels
from soko.notifications.public import send_email, send_sms
from soko.notifications.templates import (
    LOCALES,
    SAMPLE_CONTEXT,
    Rendered,
    TemplateProblem,
    render,
)
from soko.orders import events as order_events
from soko.orders.public import order_summary
from soko.platform.jobs import JobContext
from soko.platform.runtime import Runtime
from soko.sellers import events as seller_events
from soko.sellers.public import member_user_ids, seller_cards

log = structlog.get_logger("soko.notifications")

# The payments domain's events, by name: their payloads carry ``buyer_id``,
# ``amount_minor`` and ``currency``, which is all the receipts need.
PAYMENT_SUCCEEDED = "payment.succeeded"
REFUND_SUCCEEDED = "refund.succeeded"


class Audience(StrEnum):
    account = "account"  # the account the event is about (``user_id``)
    buyer = "buyer"
    seller = "seller"  # every member of the store
    admins = "admins"


E = ChannelName.email
S = ChannelName.sms
A = ChannelName.in_app


@dataclass(frozen=True, slots=True)
class Trigger:
    event: str
    audience: Audience
    template: str
    category: Category
    channels: frozenset[ChannelName]


def _t(
    event: str,
    audience: Audience,
    *channels: ChannelName,
    category: Category = Category.transactional,
) -> Trigger:
    return Trigger(event, audience, f"{event}.{audience.value}", category, frozenset(channels))


TRIGGERS: tuple[Trigger, ...] = (
    _t(order_events.ORDER_PLACED, Audience.buyer, E, A),
    _t(order_events.ORDER_PLACED, Audience.seller, E, A),
    _t(order_events.ORDER_PAID, Audience.buyer, E, S, A),
    _t(order_events.ORDER_PAID, Audience.seller, E, S, A),
    _t(order_events.ORDER_SHIPPED, Audience.buyer, E, S, A),
    # "It arrived; tell us if something is wrong": useful, not essential, so the user may
    # switch it off (the dispute window is also on the order's page).
    _t(order_events.ORDER_DELIVERED, Audience.buyer, E, A, category=Category.updates),
    _t(order_events.ORDER_DELIVERED, Audience.seller, A, category=Category.updates),
    _t(order_events.ORDER_CANCELLED, Audience.buyer, E, S, A),
    _t(order_events.ORDER_CANCELLED, Audience.seller, E, A),
    _t(order_events.ORDER_EXPIRED, Audience.buyer, E, A),
    _t(order_events.ORDER_REFUNDED, Audience.buyer, E, S, A),
    _t(order_events.ORDER_REFUNDED, Audience.seller, E, A),
    _t(order_events.DISPUTE_OPENED, Audience.seller, E, S, A),
    _t(order_events.DISPUTE_OPENED, Audience.admins, E, A),
    _t(order_events.DISPUTE_ANSWERED, Audience.buyer, E, A),
    _t(order_events.DISPUTE_ANSWERED, Audience.admins, E, A),
    _t(order_events.DISPUTE_RESOLVED, Audience.buyer, E, S, A),
    _t(order_events.DISPUTE_RESOLVED, Audience.seller, E, A),
    _t(seller_events.SELLER_APPROVED, Audience.seller, E, S, A),
    _t(seller_events.SELLER_SUSPENDED, Audience.seller, E, S, A),
    _t(NEW_DEVICE_SIGN_IN, Audience.account, E, A, category=Category.security),
    _t(PAYMENT_SUCCEEDED, Audience.buyer, E, A),
    _t(REFUND_SUCCEEDED, Audience.buyer, E, S, A),
)


def triggers_for(event: str) -> list[Trigger]:
    return [trigger for trigger in TRIGGERS if trigger.event == event]


EVENTS: tuple[str, ...] = tuple(dict.fromkeys(trigger.event for trigger in TRIGGERS))


# -- what a template sees ------------------------------------------------------------------------


def _uuid(payload: dict[str, Any], key: str) -> uuid.UUID | None:
    value = payload.get(key)
    try:
        return uuid.UUID(str(value)) if value is not None else None
    except ValueError:
        return None


def context_names(event: str) -> frozenset[str]:
    """The names a template of ``event`` can count on, as :func:`event_context` and the
    sending give them (``recipient`` included). A payment's order is not among them: a
    payment may have none."""
    names = {"app", "recipient"}
    if event.startswith(("order.", "dispute.")):
        names.add("order")  # every order and dispute event names its order
    if event.startswith("dispute."):
        names.add("dispute")
    if event.startswith("seller."):
        names.add("store")
    if event == NEW_DEVICE_SIGN_IN:
        names.add("sign_in")
    if event in (PAYMENT_SUCCEEDED, REFUND_SUCCEEDED):
        names.add("payment")
    return frozenset(names)


def template_sample_context(template: str) -> dict[str, Any]:
    """Sample data for ``template`` with only the names its message has: an override is
    checked against what it will really be rendered with, not every name there is."""
    trigger = next((t for t in TRIGGERS if t.template == template), None)
    if trigger is None:
        return dict(SAMPLE_CONTEXT)
    names = context_names(trigger.event)
    return {key: value for key, value in SAMPLE_CONTEXT.items() if key in names}


async def event_context(
    session: AsyncSession, runtime: Runtime, event: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """The names a template of ``event`` may use, from the payload and the domains'
    public reads (never ORM rows)."""
    context: dict[str, Any] = {
        # Where "view the order" links lead: the marketplace's app, or Soko's pages.
        "app": {"name": "Soko", "url": runtime.settings.effective_app_url},
    }
    order_id = _uuid(payload, "order_id")
    if order_id is not None:
        summary = await order_summary(session, order_id)
        context["order"] = {
            "id": str(order_id),
            "number": summary.number if summary else str(payload.get("number", "")),
            "total_minor": summary.subtotal_minor if summary else payload.get("subtotal_minor"),
            "currency": summary.currency if summary else payload.get("currency"),
            "status": summary.status if summary else payload.get("to_status"),
            "reason": str(payload.get("reason") or ""),
            "carrier": payload.get("carrier") or "",
            "tracking_number": payload.get("tracking_number") or "",
            "refund_minor": payload.get("refund_due_minor"),
        }
    if event.startswith("dispute."):
        context["dispute"] = {
            "id": str(payload.get("dispute_id", "")),
            "outcome": payload.get("outcome") or "",
            "refund_minor": payload.get("refund_minor"),
            "currency": payload.get("currency") or context.get("order", {}).get("currency"),
        }
    if event.startswith("seller."):
        seller_id = _uuid(payload, "seller_id")
        cards = await seller_cards(session, [seller_id]) if seller_id else {}
        card = cards.get(seller_id) if seller_id else None
        context["store"] = {
            "name": card.store_name if card else "",
            "reason": str(payload.get("reason") or ""),
        }
    if event == NEW_DEVICE_SIGN_IN:
        context["sign_in"] = {
            "device": str(payload.get("device") or "")[:100],
            "at": str(payload.get("at") or "")[:40],
        }
    if event in (PAYMENT_SUCCEEDED, REFUND_SUCCEEDED):
        context["payment"] = {
            "amount_minor": payload.get("amount_minor"),
            "currency": payload.get("currency"),
        }
    return context


async def audience_user_ids(
    session: AsyncSession, audience: Audience, payload: dict[str, Any]
) -> list[uuid.UUID]:
    if audience is Audience.buyer:
        buyer = _uuid(payload, "buyer_id")
        return [buyer] if buyer else []
    if audience is Audience.account:
        account = _uuid(payload, "user_id")
        return [account] if account else []
    if audience is Audience.seller:
        seller = _uuid(payload, "seller_id")
        return await member_user_ids(session, seller) if seller else []
    # The admins: every active administrator, as themselves (their preferences apply);
    # the operations mailbox, when configured, hears of it too (see notify()).
    return await user_ids_with_role(session, "admin")


@lru_cache(maxsize=1)
def _locales_statement() -> Any:
    locales: Any = RecipientLocale.__table__
    return select(locales.c.user_id, locales.c.locale).where(
        locales.c.user_id.in_(bindparam("user_ids", expanding=True))
    )


async def locales_of(
    session: AsyncSession, user_ids: list[uuid.UUID], default: str
) -> dict[uuid.UUID, str]:
    """Each user's chosen locale, or ``default`` (none chosen, or one no longer offered),
    in one query."""
    chosen: dict[uuid.UUID, str] = {}
    if user_ids:
        rows = await session.execute(_locales_statement(), {"user_ids": user_ids})
        chosen = {row.user_id: row.locale for row in rows if row.locale in LOCALES}
    return {user_id: chosen.get(user_id, default) for user_id in user_ids}


async def _rendered(
    runtime: Runtime, trigger: Trigger, locale: str, context: dict[str, Any]
) -> Rendered | None:
    try:
        return await render(runtime, trigger.template, locale, context)
    except TemplateProblem as exc:
        # An override that no longer renders with real data: the bundled one still does.
        log.error("template failed to render", template=trigger.template, errors=exc.errors)
        from soko.notifications.templates import bundled_source, render_source

        source = bundled_source(trigger.template, locale) or bundled_source(trigger.template, "en")
        return render_source(source, context) if source else None


async def notify(ctx: JobContext, event: str, payload: dict[str, Any]) -> int:
    """Send every message ``event`` triggers; returns how many were queued."""
    runtime: Runtime = ctx.services
    session = ctx.session
    event_id = ctx.event_id or ctx.message_id
    base = await event_context(session, runtime, event, payload)
    audiences = [
        (trigger, await audience_user_ids(session, trigger.audience, payload))
        for trigger in triggers_for(event)
    ]
    # Every recipient's contact and locale in one query each, not two per recipient: a
    # store's staff all hear of its orders.
    contacts = await contacts_of(session, runtime, (u for _, users in audiences for u in users))
    locales = await locales_of(
        session, list(contacts), runtime.settings.notifications_default_locale
    )
    queued = 0
    for trigger, user_ids in audiences:
        category = f"{trigger.category.value}.{trigger.template}"[:64]
        if trigger.audience is Audience.admins:
            queued += await _notify_operations_mailbox(
                session, runtime, trigger, base, category, event_id
            )
        for user_id in user_ids:
            contact = contacts.get(user_id)
            if contact is None:
                continue  # deleted or blocked: no messages
            queued += await _notify_user(
                ctx, trigger, contact, locales[user_id], base, category, event_id
            )
    return queued


async def _notify_operations_mailbox(
    session: AsyncSession,
    runtime: Runtime,
    trigger: Trigger,
    base: dict[str, Any],
    category: str,
    event_id: uuid.UUID,
) -> int:
    """The marketplace's shared inbox (``SOKO_NOTIFICATIONS_ADMIN_EMAIL``), when set."""
    address = runtime.settings.notifications_admin_email.strip()
    if not address or E not in trigger.channels:
        return 0
    context = {**base, "recipient": {"name": "Soko team"}}
    rendered = await _rendered(
        runtime, trigger, runtime.settings.notifications_default_locale, context
    )
    if rendered is not None and await send_email(
        session,
        to=address,
        subject=rendered.subject,
        text=rendered.text,
        html=rendered.html,
        category=category,
        dedupe_key=f"{event_id}:{trigger.template}:admins",
    ):
        return 1
    return 0


async def _notify_user(
    ctx: JobContext,
    trigger: Trigger,
    contact: Contact,
    locale: str,
    base: dict[str, Any],
    category: str,
    event_id: uuid.UUID,
) -> int:
    runtime: Runtime = ctx.services
    session = ctx.session
    user_id = contact.user_id
    allowed = trigger.channels & await allowed_channels(session, user_id, trigger.category)
    if not allowed:
        return 0
    context = {**base, "recipient": {"name": contact.display_name or ""}}
    rendered = await _rendered(runtime, trigger, locale, context)
    if rendered is None:
        return 0
    key = f"{event_id}:{trigger.template}:{user_id}"
    queued = 0
    # Only to an address or number the user proved is theirs (see Contact): signing up
    # with someone else's must not let anyone have the marketplace message them.
    if E in allowed and contact.email and contact.email_verified:
        queued += await send_email(
            session,
            to=contact.email,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            category=category,
            dedupe_key=key,
            user_id=user_id,
        )
    if S in allowed and contact.phone and contact.phone_verified and rendered.sms:
        queued += await send_sms(
            session,
            to=contact.phone,
            body=rendered.sms,
            category=category,
            dedupe_key=key,
            user_id=user_id,
        )
    if A in allowed:
        order = base.get("order")
        added = await add_to_inbox(
            session,
            pubsub=runtime.pubsub,
            user_id=user_id,
            category=trigger.category.value,
            title=rendered.title,
            body=rendered.text,
            data={"event": trigger.event, "template": trigger.template}
            | ({"order_id": order["id"]} if isinstance(order, dict) else {}),
            dedupe_key=key,
        )
        queued += added is not None
    return queued
