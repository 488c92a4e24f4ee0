"""Plain HTML pages Soko serves itself, outside ``/api/v1``, for a person following a
link when the marketplace has no page of its own for it (a payment's return, an email's
verification or reset link).

No script, every value escaped by the caller, and a content security policy that allows
only the page's own stylesheet and, where the page has a form, posts to itself.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem;"
    "color:#1b1b1b}label{display:block;margin:.8rem 0 .2rem}"
    "input{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}"
    "button{margin-top:1rem;padding:.7rem 1.2rem;font-size:1rem;border:0;border-radius:.3rem;"
    "background:#1e7d32;color:#fff;cursor:pointer}.error{color:#b3261e}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()


def page_csp(*, form: bool = False) -> str:
    form_action = "'self'" if form else "'none'"
    return (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action {form_action}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def plain_page(
    title: str, body_html: str, *, status: int = 200, form: bool = False
) -> HTMLResponse:
    """A page titled ``title`` (escaped here) around ``body_html`` (escaped by the
    caller); never cached, never indexed, never framed."""
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body_html}</body></html>"
    )
    return HTMLResponse(
        html,
        status_code=status,
        headers={
            "content-security-policy": page_csp(form=form),
            "cache-control": "no-store",
            "referrer-policy": "no-referrer",
        },
    )


class FormError(ValueError):
    """A form post that could not be read; its text is fit to show on the page."""


async def read_form(request: Request, *, max_fields: int = 20) -> dict[str, list[str]]:
    """The fields of an ``application/x-www-form-urlencoded`` post (a page's own form)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise FormError("send the page's form")
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
        return parse_qs(
            text, keep_blank_values=True, strict_parsing=False, max_num_fields=max_fields
        )
    except (UnicodeDecodeError, ValueError):
        raise FormError("the form could not be read") from None


def one_field(fields: dict[str, list[str]], name: str) -> str | None:
    """The one value of ``name``, or None; a field given twice is refused."""
    values = fields.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise FormError(f"{name} is given more than once")
    return values[0]
