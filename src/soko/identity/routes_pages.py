"""The pages the links in Soko's emails open when the marketplace has none of its own
(``SOKO_APP_URL`` empty): ``/verify-email`` and ``/reset-password``, outside ``/api/v1``.

Opening a link changes nothing: mail scanners and link previews fetch every link in a
message, and a verification spent by a scanner would leave the owner's click with an
error. The page shows a button (or the new password's form) that posts back to it; the
post does what ``POST /api/v1/auth/email/verify`` and ``/password/reset`` do, with the
same checks, limits and audit events, and answers with a page.

The token in the link is the capability, as in the API. The pages are plain HTML with
every value escaped, no script, posts only to themselves, and no referrer sent onward.
"""

from __future__ import annotations

from html import escape
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from soko.identity import signin
from soko.identity.passwords import MAX_PASSWORD_LENGTH
from soko.identity.routes_auth import PASSWORD_FIELD_MAX
from soko.platform.auth import Principal, public
from soko.platform.errors import ProblemError
from soko.platform.pages import FormError, one_field, plain_page, read_form
from soko.platform.runtime import RuntimeDep

router = APIRouter(include_in_schema=False)
Visitor = Annotated[Principal | None, public()]

TOKEN_MAX = 256
MAX_FORM_FIELDS = 5
LinkToken = Annotated[str, Query(max_length=TOKEN_MAX)]


def _token_field(token: str) -> str:
    return f'<input type="hidden" name="token" value="{escape(token)}">'


def _no_token() -> HTMLResponse:
    return plain_page(
        "Link incomplete",
        "<p>This link has no token. Open the whole link from the email; if it still does "
        "not work, ask for a new one.</p>",
        status=400,
    )


def _refused(title: str, exc: ProblemError) -> HTMLResponse:
    return plain_page(title, f'<p class="error">{escape(exc.detail)}</p>', status=exc.status)


async def _form_token(request: Request) -> tuple[dict[str, list[str]], str]:
    fields = await read_form(request, max_fields=MAX_FORM_FIELDS)
    token = (one_field(fields, "token") or "").strip()
    if not token or len(token) > TOKEN_MAX:
        raise FormError("the link's token is missing")
    return fields, token


# -- email verification -----------------------------------------------------------------


@router.get("/verify-email", response_class=HTMLResponse)
async def verify_email_page(_visitor: Visitor, token: LinkToken = "") -> HTMLResponse:
    if not token:
        return _no_token()
    return plain_page(
        "Confirm your email address",
        '<form method="post">'
        + _token_field(token)
        + "<p>Confirm that this email address is yours.</p>"
        '<button type="submit">Confirm my email address</button></form>',
        form=True,
    )


@router.post("/verify-email", response_class=HTMLResponse)
async def verify_email_post(
    request: Request, runtime: RuntimeDep, facts: signin.FactsDep, _visitor: Visitor
) -> HTMLResponse:
    try:
        _fields, token = await _form_token(request)
    except FormError as exc:
        return plain_page("Email not confirmed", f"<p>{escape(str(exc))}.</p>", status=422)
    try:
        async with runtime.transaction() as session:
            await signin.verify_email(session, runtime, token=token, facts=facts)
    except ProblemError as exc:
        return _refused("Email not confirmed", exc)
    return plain_page(
        "Email address confirmed",
        "<p>Thank you: your email address is confirmed. You may close this page.</p>",
    )


# -- password reset ---------------------------------------------------------------------


def _reset_form(token: str, runtime: RuntimeDep, error: str = "") -> str:
    minimum = runtime.settings.password_min_length
    message = f'<p class="error">{escape(error)}</p>' if error else ""
    return (
        message + '<form method="post">' + _token_field(token) + "<p>At least "
        f"{minimum} characters; a phrase of several words is easy to remember and hard "
        "to guess. Every device signed in to the account is signed out.</p>"
        '<label for="new_password">New password</label>'
        '<input id="new_password" name="new_password" type="password" '
        f'autocomplete="new-password" required minlength="{minimum}" '
        f'maxlength="{MAX_PASSWORD_LENGTH}">'
        '<label for="repeat">The same password again</label>'
        '<input id="repeat" name="repeat" type="password" autocomplete="new-password" '
        f'required minlength="{minimum}" maxlength="{MAX_PASSWORD_LENGTH}">'
        '<button type="submit">Set the new password</button></form>'
    )


@router.get("/reset-password", response_class=HTMLResponse)
async def reset_password_page(
    runtime: RuntimeDep, _visitor: Visitor, token: LinkToken = ""
) -> HTMLResponse:
    if not token:
        return _no_token()
    return plain_page("Choose a new password", _reset_form(token, runtime), form=True)


@router.post("/reset-password", response_class=HTMLResponse)
async def reset_password_post(
    request: Request, runtime: RuntimeDep, facts: signin.FactsDep, _visitor: Visitor
) -> HTMLResponse:
    title = "Choose a new password"
    try:
        fields, token = await _form_token(request)
        password = one_field(fields, "new_password") or ""
        repeat = one_field(fields, "repeat")
    except FormError as exc:
        return plain_page("Password not changed", f"<p>{escape(str(exc))}.</p>", status=422)
    if repeat is not None and repeat != password:
        form = _reset_form(token, runtime, "The two passwords differ; type them again.")
        return plain_page(title, form, status=422, form=True)
    if not password or len(password) > PASSWORD_FIELD_MAX:
        # A longer one than the policy takes (but not absurdly long) is the policy's to
        # refuse, with its own words.
        form = _reset_form(token, runtime, "Type a new password.")
        return plain_page(title, form, status=422, form=True)
    try:
        async with runtime.transaction() as session:
            await signin.reset_password(
                session, runtime, token=token, new_password=password, facts=facts
            )
    except ProblemError as exc:
        if exc.status == 422:
            # The policy refused the password: the link is not spent, try another.
            form = _reset_form(token, runtime, exc.detail)
            return plain_page(title, form, status=422, form=True)
        return _refused("Password not changed", exc)
    return plain_page(
        "Password changed",
        "<p>Your new password is set, and every device was signed out. Sign in again "
        "with the new password.</p>",
    )
