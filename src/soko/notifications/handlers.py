"""Delivery jobs: open the sealed notification and hand it to its channel.

``ctx.services`` is the process's :class:`soko.platform.runtime.Runtime`: its data keys
open the payload (an older key still opens messages sealed before a rotation) and its
settings choose the channel. :func:`soko.notifications.deliveries.deliver` keeps the
delivery record; a transient failure leaves the job to the outbox's retries; a payload
that does not open fails the same way and ends dead, its text never logged.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, update

from soko.identity.events import USER_DELETED, UserDeleted
from soko.notifications import inbox  # noqa: F401  (registers the in-app push job)
from soko.notifications.deliveries import deliver
from soko.notifications.messages import EMAIL_JOB, SMS_JOB, NotificationKind, unseal
from soko.notifications.models import Delivery, InboxNotification, Preference, RecipientLocale
from soko.notifications.triggers import EVENTS, notify
from soko.platform.jobs import JobContext, registry
from soko.platform.runtime import Runtime


async def _deliver(ctx: JobContext, kind: NotificationKind, payload: dict[str, Any]) -> None:
    runtime: Runtime = ctx.services
    notification = unseal(kind, payload, runtime.data_keys.keyring)
    await deliver(ctx, notification)


@registry.job(SMS_JOB)
async def deliver_sms(ctx: JobContext, payload: dict[str, Any]) -> None:
    await _deliver(ctx, NotificationKind.sms, payload)


@registry.job(EMAIL_JOB)
async def deliver_email(ctx: JobContext, payload: dict[str, Any]) -> None:
    await _deliver(ctx, NotificationKind.email, payload)


# -- domain events ------------------------------------------------------------------------------


def _subscribe(event: str) -> None:
    async def on_event(ctx: JobContext, payload: dict[str, Any]) -> None:
        await notify(ctx, event, payload)

    registry.on(event, name=f"notifications.{event}")(on_event)


for _event in EVENTS:
    _subscribe(_event)


@registry.on(USER_DELETED, name="notifications.forget_user")
async def forget_user(ctx: JobContext, payload: dict[str, Any]) -> None:
    """A deleted account's in-app notifications (their texts name the person),
    preferences and language go; delivery records keep no user id (they hold no address
    in clear, only its blind index, which suppressions need)."""
    user_id = UserDeleted.model_validate(payload).user_id
    session = ctx.session
    await session.execute(delete(InboxNotification).where(InboxNotification.user_id == user_id))
    await session.execute(delete(Preference).where(Preference.user_id == user_id))
    await session.execute(delete(RecipientLocale).where(RecipientLocale.user_id == user_id))
    await session.execute(
        update(Delivery)
        .where(Delivery.user_id == user_id)
        .values(user_id=None)
        .execution_options(synchronize_session=False)
    )
