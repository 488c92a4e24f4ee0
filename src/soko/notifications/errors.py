"""The problems the notifications domain answers (documented in
docs/problems/notifications.md)."""

from __future__ import annotations

from soko.platform.errors import ProblemError


class CallbackUnverified(ProblemError):
    slug = "notification-callback-unverified"
    title = "The delivery report could not be verified"
    status = 401
    description = (
        "A provider's delivery report arrived without a valid signature (Twilio, SendGrid) "
        "or token (Africa's Talking), or the provider is not configured; it was ignored."
    )


class TemplateInvalid(ProblemError):
    slug = "notification-template-invalid"
    title = "The template is not valid"
    status = 422
    description = (
        "The template does not compile, fails to render with the sample data (or goes "
        "past the sandbox's limits on sizes, steps and output), lacks a required part, or "
        "its SMS text is longer than allowed; `errors` says which."
    )


class PreferenceLocked(ProblemError):
    slug = "notification-preference-locked"
    title = "These messages cannot be switched off"
    status = 422
    description = (
        "Security and transactional messages (sign-in codes, password resets, orders) "
        "always reach a user by every channel they have; only updates and marketing "
        "messages can be switched off."
    )
