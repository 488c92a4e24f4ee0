"""The events the identity domain publishes (through the outbox)."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, ConfigDict

USER_DELETED = "identity.user_deleted"
NEW_DEVICE_SIGN_IN = "identity.new_device_sign_in"


class UserDeleted(BaseModel):
    """A user deleted their account: other domains erase their copies of personal data
    and keep records that law requires under the (now anonymous) user id."""

    model_config = ConfigDict(frozen=True)

    user_id: uuid.UUID


class NewDeviceSignIn(BaseModel):
    """A user signed in from a device their account had not used before: the account's
    owner is told, in case it was not them."""

    model_config = ConfigDict(frozen=True)

    user_id: uuid.UUID
    device: str
    at: dt.datetime
