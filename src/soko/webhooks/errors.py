"""The webhooks domain's problem types."""

from __future__ import annotations

from soko.platform.errors import ProblemError


class WebhookUrlRefused(ProblemError):
    slug = "webhook-url-refused"
    title = "This URL cannot receive webhooks"
    status = 422
    description = (
        "The endpoint's URL is not one the marketplace will call: it is not an absolute "
        "http(s) URL, it carries credentials, it uses http where https is required, or it "
        "points to a private, loopback, link-local or otherwise non-public address."
    )


class WebhookEndpointDisabled(ProblemError):
    slug = "webhook-endpoint-disabled"
    title = "The endpoint is disabled"
    status = 409
    description = (
        "Nothing is sent to a disabled endpoint, so nothing can be redelivered to it. "
        "Enable it first (PATCH with enabled: true)."
    )


class WebhookEndpointLimit(ProblemError):
    slug = "webhook-endpoint-limit"
    title = "Too many webhook endpoints"
    status = 409
    description = (
        "A store, or the marketplace, may register a limited number of endpoints "
        "(`limit`). Delete one you no longer use, or subscribe an existing endpoint to "
        "more event types."
    )
