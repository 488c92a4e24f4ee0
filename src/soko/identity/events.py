"""The events the identity domain publishes (through the outbox)."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict

USER_DELETED = "identity.user_deleted"


class UserDeleted(BaseModel):
    """A user deleted their account: other domains erase their copies of personal data
    and keep records that law requires under the (now anonymous) user id."""

    model_config = ConfigDict(frozen=True)

    user_id: uuid.UUID
