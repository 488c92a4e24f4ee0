"""A user's choice of channels per category of messages.

Four categories: ``security`` (sign-in codes, password resets, a new sign-in) and
``transactional`` (orders, payments, disputes, the user's store) always go out by every
channel the trigger uses: they cannot be switched off. ``updates`` and ``marketing``
can, per channel (email, sms, in_app). A user with no stored choice gets every channel.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.models import Preference, RecipientLocale
from soko.platform.db import dialect_insert
from soko.platform.ids import uuid7
from soko.platform.outbox import session_now


class Category(StrEnum):
    security = "security"
    transactional = "transactional"
    updates = "updates"
    marketing = "marketing"


class ChannelName(StrEnum):
    email = "email"
    sms = "sms"
    in_app = "in_app"


LOCKED: frozenset[Category] = frozenset({Category.security, Category.transactional})
ALL_CHANNELS: frozenset[ChannelName] = frozenset(ChannelName)


async def preferences_of(
    session: AsyncSession, user_id: uuid.UUID
) -> dict[Category, frozenset[ChannelName]]:
    """Every category with the channels the user allows for it."""
    rows = (await session.scalars(select(Preference).where(Preference.user_id == user_id))).all()
    stored = {row.category: row for row in rows}
    chosen: dict[Category, frozenset[ChannelName]] = {}
    for category in Category:
        row = stored.get(category.value)
        if category in LOCKED or row is None:
            chosen[category] = ALL_CHANNELS
        else:
            chosen[category] = frozenset(
                name
                for name, on in (
                    (ChannelName.email, row.email),
                    (ChannelName.sms, row.sms),
                    (ChannelName.in_app, row.in_app),
                )
                if on
            )
    return chosen


async def allowed_channels(
    session: AsyncSession, user_id: uuid.UUID, category: Category
) -> frozenset[ChannelName]:
    if category in LOCKED:
        return ALL_CHANNELS
    return (await preferences_of(session, user_id))[category]


async def set_preferences(
    session: AsyncSession,
    user_id: uuid.UUID,
    choices: dict[Category, dict[ChannelName, bool]],
) -> None:
    """Store the user's choices (one upsert per category, so two concurrent saves end
    with one of them whole). Locked categories must not be in ``choices`` with a
    channel switched off: the caller refuses that first (:data:`LOCKED`)."""
    now = session_now(session)
    insert = dialect_insert(session)
    for category, channels in choices.items():
        if category in LOCKED:
            continue
        current = (await preferences_of(session, user_id))[category]
        values = {name.value: channels.get(name, name in current) for name in ChannelName}
        statement = insert(Preference).values(
            id=uuid7(), user_id=user_id, category=category.value, updated_at=now, **values
        )
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=["user_id", "category"],
                set_={**values, "updated_at": now},
            )
        )


async def set_locale(session: AsyncSession, user_id: uuid.UUID, locale: str) -> None:
    """The language of the user's messages from now on (an upsert)."""
    now = session_now(session)
    insert = dialect_insert(session)
    await session.execute(
        insert(RecipientLocale)
        .values(user_id=user_id, locale=locale, updated_at=now)
        .on_conflict_do_update(
            index_elements=["user_id"], set_={"locale": locale, "updated_at": now}
        )
    )
