"""The sandbox provider's hosted payment page, ``/sandbox/pay/<token>`` (outside
``/api/v1``: it is a page for a person, not an API).

GET shows the charge (amount, currency, merchant reference) with three buttons, succeed,
fail and abandon, and the delivery options: a delay before the webhook, extra duplicate
deliveries of it, and a stale ``charge.pending`` event sent after the outcome. POST
records the outcome once (a conditional UPDATE on ``status = 'pending'`` settles two
concurrent choices), queues the webhook deliveries in the same transaction, and
redirects (303) to the charge's return URL with ``?reference=...&status=...``, or shows
a result page when the charge has none.

No sign-in: the page token in the URL (256 random bits, stored only as a digest) is the
capability. The page is plain HTML with every value escaped, no script, and a content
security policy allowing only its own hashed stylesheet and form posts to itself and
the return URL's origin. When the sandbox is not among ``SOKO_PAYMENT_PROVIDERS`` the
page does not exist.
"""

from __future__ import annotations

import base64
import hashlib
import math
from html import escape
from typing import Annotated
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select, update

from soko.payments.providers.sandbox import PAGE_TOKEN, facts_of, page_token_hash
from soko.payments.sandbox_delivery import (
    MAX_DELAY_SECONDS,
    MAX_DUPLICATES,
    DeliveryPlan,
    queue_outcome,
    sandbox_state,
)
from soko.payments.sandbox_models import ChargeStatus, SandboxCharge
from soko.platform.auth import Principal, public
from soko.platform.http import register_secret_path_prefix
from soko.platform.money import MINOR_UNITS
from soko.platform.pages import FormError, one_field, read_form
from soko.platform.runtime import RuntimeDep, SessionDep

router = APIRouter(include_in_schema=False)
# The page's path segment is the capability to decide the payment: keep it out of logs.
register_secret_path_prefix("/sandbox/pay/")

# Anyone may open the page: the token is the capability.
Visitor = Annotated[Principal | None, public()]

OUTCOMES = (ChargeStatus.succeeded, ChargeStatus.failed, ChargeStatus.abandoned)
MAX_FORM_FIELDS = 20

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;"
    "color:#1b1b1b}"
    "h1{font-size:1.4rem}.amount{font-size:2rem;font-weight:600;margin:.5rem 0}"
    "dl{display:grid;grid-template-columns:auto 1fr;gap:.25rem 1rem}dt{color:#555}"
    "dd{margin:0;overflow-wrap:anywhere}fieldset{margin:1rem 0;border:1px solid #ccc}"
    "label{display:block;margin:.4rem 0}.buttons{display:flex;gap:.5rem}"
    "button{flex:1;padding:.7rem;font-size:1rem;border:0;border-radius:.3rem;cursor:pointer}"
    ".succeed{background:#1e7d32;color:#fff}.fail{background:#b3261e;color:#fff}"
    ".abandon{background:#ddd}.note{color:#555;font-size:.9rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()


def _csp(return_url: str = "") -> str:
    form_targets = "'self'"
    origin = _origin(return_url)
    if origin:
        # Browsers apply form-action to the redirect that follows the post, too.
        form_targets += f" {origin}"
    return (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action {form_targets}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def _origin(url: str) -> str:
    if not url:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _page(title: str, body: str, *, status: int = 200, return_url: str = "") -> HTMLResponse:
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{escape(title)} · Soko sandbox</title><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}"
        '<p class="note">Soko sandbox payment provider: no money moves.</p></body></html>'
    )
    return HTMLResponse(
        html,
        status_code=status,
        headers={"content-security-policy": _csp(return_url), "cache-control": "no-store"},
    )


def _not_found() -> HTMLResponse:
    return _page(
        "Payment not found",
        "<p>This payment link is not valid. It may have been replaced by a newer one.</p>",
        status=404,
    )


def format_amount(amount_minor: int, currency: str) -> str:
    exponent = MINOR_UNITS.get(currency, 2)
    whole, fraction = divmod(amount_minor, 10**exponent)
    text = f"{whole:,}"
    if exponent:
        text += f".{fraction:0{exponent}d}"
    return f"{currency} {text}"


def _summary(charge: SandboxCharge) -> str:
    rows = [("Merchant reference", charge.reference)]
    if charge.description:
        rows.append(("Description", charge.description))
    rows.append(("Status", charge.status))
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    amount = escape(format_amount(charge.amount_minor, charge.currency))
    return f'<p class="amount">{amount}</p><dl>{items}</dl>'


async def _charge_by_token(session: SessionDep, token: str) -> SandboxCharge | None:
    if not PAGE_TOKEN.fullmatch(token):
        return None
    charge: SandboxCharge | None = await session.scalar(
        select(SandboxCharge).where(SandboxCharge.page_token_hash == page_token_hash(token))
    )
    return charge


def _sandbox_enabled(runtime: RuntimeDep) -> bool:
    return "sandbox" in runtime.settings.payment_providers


@router.get("/sandbox/pay/{token}", response_class=HTMLResponse)
async def payment_page(
    token: str, session: SessionDep, runtime: RuntimeDep, _visitor: Visitor
) -> Response:
    if not _sandbox_enabled(runtime):
        return _not_found()
    # On SQLite a charge may still be waiting for the write lock (see SandboxState).
    await sandbox_state(runtime).writes_settled()
    charge = await _charge_by_token(session, token)
    if charge is None:
        return _not_found()
    if charge.status != ChargeStatus.pending:
        return _page(
            "Payment already decided",
            _summary(charge) + f"<p>This payment was already {escape(charge.status)}.</p>",
        )
    settings = runtime.settings
    form = (
        '<form method="post">'
        "<fieldset><legend>Webhook delivery</legend>"
        '<label>Delay in seconds <input type="number" name="delay_seconds" min="0" '
        f'max="{MAX_DELAY_SECONDS:g}" step="any" value="{settings.sandbox_delay_seconds:g}">'
        "</label>"
        '<label>Extra duplicate deliveries <input type="number" name="duplicates" min="0" '
        f'max="{MAX_DUPLICATES}" step="1" value="{settings.sandbox_duplicate_deliveries}">'
        "</label>"
        '<label><input type="checkbox" name="stale_pending" value="1"> Also send a stale '
        '"pending" event after the outcome (out of order)</label>'
        "</fieldset>"
        '<div class="buttons">'
        '<button class="succeed" name="outcome" value="succeeded">Succeed</button>'
        '<button class="fail" name="outcome" value="failed">Fail</button>'
        '<button class="abandon" name="outcome" value="abandoned">Abandon</button>'
        "</div></form>"
    )
    return _page("Pay with the sandbox", _summary(charge) + form, return_url=charge.return_url)


def _read_choice(
    fields: dict[str, list[str]], default_delay: float, default_duplicates: int
) -> tuple[ChargeStatus, DeliveryPlan]:
    def one(name: str) -> str | None:
        value = one_field(fields, name)
        return None if value is None else value.strip()

    outcome_text = one("outcome")
    outcome = next((o for o in OUTCOMES if o.value == outcome_text), None)
    if outcome is None:
        raise FormError("choose succeed, fail or abandon")
    delay_text = one("delay_seconds")
    delay = default_delay
    if delay_text:
        try:
            delay = float(delay_text)
        except ValueError:
            raise FormError("the delay must be a number of seconds") from None
        if not math.isfinite(delay) or not 0 <= delay <= MAX_DELAY_SECONDS:
            raise FormError(f"the delay must be between 0 and {MAX_DELAY_SECONDS:g} seconds")
    duplicates_text = one("duplicates")
    duplicates = default_duplicates
    if duplicates_text:
        if not duplicates_text.isdecimal() or len(duplicates_text) > 3:
            raise FormError("duplicates must be a whole number")
        duplicates = int(duplicates_text)
        if duplicates > MAX_DUPLICATES:
            raise FormError(f"duplicates must be between 0 and {MAX_DUPLICATES}")
    stale = one("stale_pending") in ("1", "on", "true")
    return outcome, DeliveryPlan(delay, duplicates, stale)


def return_location(return_url: str, reference: str, status: str) -> str:
    """The return URL with ``reference`` and ``status`` set in its query."""
    parts = urlsplit(return_url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in ("reference", "status")
    ]
    query += [("reference", reference), ("status", status)]
    return urlunsplit(parts._replace(query=urlencode(query)))


@router.post("/sandbox/pay/{token}", response_class=HTMLResponse)
async def choose_outcome(
    token: str, request: Request, session: SessionDep, runtime: RuntimeDep, _visitor: Visitor
) -> Response:
    if not _sandbox_enabled(runtime) or not PAGE_TOKEN.fullmatch(token):
        return _not_found()
    await sandbox_state(runtime).writes_settled()
    settings = runtime.settings
    try:
        fields = await read_form(request, max_fields=MAX_FORM_FIELDS)
        outcome, plan = _read_choice(
            fields, settings.sandbox_delay_seconds, settings.sandbox_duplicate_deliveries
        )
    except FormError as exc:
        return _page("Payment not changed", f"<p>{escape(str(exc))}.</p>", status=422)
    now = runtime.clock.now()
    charge: SandboxCharge | None = (
        await session.execute(
            update(SandboxCharge)
            .where(
                SandboxCharge.page_token_hash == page_token_hash(token),
                SandboxCharge.status == ChargeStatus.pending.value,
            )
            .values(status=outcome.value, decided_at=now, updated_at=now)
            .returning(SandboxCharge)
            .execution_options(synchronize_session=False)
        )
    ).scalar_one_or_none()
    if charge is None:
        existing = await _charge_by_token(session, token)
        if existing is None:
            return _not_found()
        return _page(
            "Payment already decided",
            _summary(existing) + f"<p>This payment was already {escape(existing.status)}; "
            "it cannot be decided twice.</p>",
            status=409,
        )
    await queue_outcome(session, facts_of(charge), plan, now=now, pending_since=charge.created_at)
    if charge.return_url:
        return RedirectResponse(
            return_location(charge.return_url, charge.reference, charge.status),
            status_code=303,
            headers={"content-security-policy": _csp(charge.return_url)},
        )
    return _page(
        f"Payment {charge.status}",
        _summary(charge) + "<p>The webhook is on its way to the merchant.</p>",
    )
