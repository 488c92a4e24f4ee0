"""Templates: SMS segment counting, the sandbox and autoescape, and the administrators'
list, edit, reset and preview routes."""

from __future__ import annotations

import httpx2
import pytest

from soko.identity.models import Role
from soko.notifications.templates import (
    SAMPLE_CONTEXT,
    TemplateProblem,
    bundled_source,
    format_money,
    render_source,
    sms_segments,
    template_names,
)
from soko.notifications.triggers import TRIGGERS, context_names, template_sample_context
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser, make_user  # noqa: F401

ADMIN = "/api/v1/admin/notifications/templates"

GOOD = """{% block subject %}Order {{ order.number }}{% endblock %}
{% block title %}Order {{ order.number }}{% endblock %}
{% block text %}Hi {{ recipient.name }}{% endblock %}
{% block html %}<p>Hi {{ recipient.name }}</p>{% endblock %}
{% block sms %}Soko: order {{ order.number }}{% endblock %}
"""


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        ("", "GSM-7", 0, 1),
        ("a" * 160, "GSM-7", 160, 1),
        ("a" * 161, "GSM-7", 161, 2),  # 153 per concatenated segment
        ("a" * 306, "GSM-7", 306, 2),
        ("a" * 307, "GSM-7", 307, 3),
        ("€" * 80, "GSM-7", 160, 1),  # an extension character takes two septets
        ("€" * 81, "GSM-7", 162, 2),
        ("Habari Wanjiku, oda yako imefika. Asante! @£$¥èé", "GSM-7", 48, 1),
        ("ñ" * 160, "GSM-7", 160, 1),  # in the basic table
        ("ç" * 70, "UCS-2", 70, 1),  # lowercase c-cedilla is not (only Ç is)
        ("ç" * 71, "UCS-2", 71, 2),  # 67 per concatenated segment
        ("a" * 134 + "✓", "UCS-2", 135, 3),
        ("😀" * 35, "UCS-2", 70, 1),  # an emoji is two UTF-16 code units
        ("😀" * 36, "UCS-2", 72, 2),
    ],
)
def test_sms_segments(text: str, encoding: str, units: int, segments: int) -> None:
    length = sms_segments(text)
    assert (length.encoding, length.units, length.segments) == (encoding, units, segments)


def test_money_is_formatted_in_the_currencys_minor_units() -> None:
    assert format_money(250_000, "KES") == "KES 2,500.00"
    assert format_money(2_500, "UGX") == "UGX 2,500"
    assert format_money(-5, "USD") == "USD -0.05"
    assert format_money(None, "KES") == ""


def test_html_is_escaped_and_text_is_not() -> None:
    context = {**SAMPLE_CONTEXT, "recipient": {"name": "<script>alert(1)</script> & Co"}}
    rendered = render_source(GOOD, context)
    assert "&lt;script&gt;" in rendered.html and "<script>" not in rendered.html
    assert rendered.text == "Hi <script>alert(1)</script> & Co"


@pytest.mark.parametrize(
    ("source", "part"),
    [
        ("{% block subject %}{{ order.number }{% endblock %}", "subject"),  # syntax error
        (GOOD.replace("recipient.name", "recipient.secret"), "text"),  # undefined
        (GOOD.replace("{% block title %}Order {{ order.number }}{% endblock %}", ""), "title"),
        (GOOD.replace("Soko: order", "Soko: order " + "x" * 500), "sms"),
        (GOOD.replace("{% block subject %}Order", "{% block subject %}Order\\n"), "subject"),
        # The sandbox refuses Python internals.
        (
            GOOD.replace(
                "Hi {{ recipient.name }}{% endblock %}\n{% block html",
                "{{ ''.__class__.__mro__ }}{% endblock %}\n{% block html",
            ),
            "text",
        ),
        (
            GOOD.replace(
                "Hi {{ recipient.name }}{% endblock %}\n{% block html",
                "{{ recipient.name.format.__globals__ }}{% endblock %}\n{% block html",
            ),
            "text",
        ),
    ],
)
def test_invalid_templates_name_the_part(source: str, part: str) -> None:
    source = source.replace("\\n", "\n")
    with pytest.raises(TemplateProblem) as caught:
        render_source(source, SAMPLE_CONTEXT)
    assert part in {error["part"] for error in caught.value.errors}, caught.value.errors


def test_every_bundled_template_exists_in_both_locales() -> None:
    for name in template_names():
        assert bundled_source(name, "en") and bundled_source(name, "sw"), name


def test_every_bundled_template_renders_with_only_its_messages_names() -> None:
    # Each template is checked with the names its message is sent with, no more.
    assert {trigger.template for trigger in TRIGGERS} == set(template_names())
    for trigger in TRIGGERS:
        context = template_sample_context(trigger.template)
        assert set(context) == context_names(trigger.event) <= set(SAMPLE_CONTEXT)
        for locale in ("en", "sw"):
            render_source(bundled_source(trigger.template, locale) or "", context)
    assert set(template_sample_context("seller.approved.seller")) == {
        "app",
        "recipient",
        "store",
    }
    assert bundled_source("../../etc/passwd", "en") is None
    assert bundled_source("order.paid.buyer", "fr") is None


async def test_admins_list_edit_preview_and_reset_templates(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    admin = await make_user(Role.admin)
    listing = await client.get(ADMIN, headers=admin.headers)
    assert listing.status_code == 200
    entries = listing.json()
    assert {
        "name": "order.paid.buyer",
        "locale": "sw",
        "overridden": False,
        "version": None,
    } in entries
    assert len(entries) == 2 * len(template_names())

    path = f"{ADMIN}/order.paid.buyer/sw"
    current = (await client.get(path, headers=admin.headers)).json()
    assert current["source"] == current["default_source"] and not current["overridden"]

    bad = await client.put(
        path, json={"source": "{% block subject %}{{ x }"}, headers=admin.headers
    )
    assert bad.status_code == 422
    assert bad.json()["type"] == "/problems/notification-template-invalid"
    assert bad.json()["errors"][0]["part"] == "subject"
    # Each error is a field error like any 422's: where, what and why.
    [error] = bad.json()["errors"]
    assert {key: error[key] for key in ("in", "field", "pointer", "code")} == {
        "in": "body",
        "field": "source",
        "pointer": "#/source",
        "code": "template_invalid",
    }
    assert error["detail"].startswith("subject: ")
    too_long = GOOD.replace("Soko: order", "Soko: " + "ç" * 210)  # UCS-2: 4 segments
    answer = await client.put(path, json={"source": too_long}, headers=admin.headers)
    assert answer.status_code == 422 and answer.json()["errors"][0]["part"] == "sms"

    stored = await client.put(path, json={"source": GOOD}, headers=admin.headers)
    assert stored.status_code == 200, stored.text
    assert stored.json()["overridden"] and stored.json()["version"] == 1
    assert (await client.put(path, json={"source": GOOD}, headers=admin.headers)).json()[
        "version"
    ] == 2

    preview = await client.post(f"{path}/preview", json={}, headers=admin.headers)
    assert preview.status_code == 200
    assert preview.json()["subject"] == "Order SK-20300101-0001"
    assert preview.json()["sms"] == {
        "text": "Soko: order SK-20300101-0001",
        "encoding": "GSM-7",
        "units": 28,
        "segments": 1,
    }
    custom = await client.post(
        f"{path}/preview",
        json={"source": GOOD, "data": {"recipient": {"name": "<b>Juma</b>"}}},
        headers=admin.headers,
    )
    assert custom.json()["html"] == "<p>Hi &lt;b&gt;Juma&lt;/b&gt;</p>"
    assert custom.json()["text"] == "Hi <b>Juma</b>"

    reset = await client.delete(path, headers=admin.headers)
    assert reset.status_code == 200 and not reset.json()["overridden"]
    assert reset.json()["source"] == bundled_source("order.paid.buyer", "sw")

    assert (
        await client.get(f"{ADMIN}/no.such.template/en", headers=admin.headers)
    ).status_code == 404
    assert (
        await client.get(f"{ADMIN}/order.paid.buyer/fr", headers=admin.headers)
    ).status_code == 422


async def test_an_override_is_used_for_real_messages(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    from soko.notifications.templates import render

    admin = await make_user(Role.admin)
    # Sending reads the overrides through the cache: this first render fills it.
    bundled = await render(runtime, "order.paid.buyer", "en", SAMPLE_CONTEXT)
    await client.put(f"{ADMIN}/order.paid.buyer/en", json={"source": GOOD}, headers=admin.headers)
    english = await render(runtime, "order.paid.buyer", "en", SAMPLE_CONTEXT)
    swahili = await render(runtime, "order.paid.buyer", "sw", SAMPLE_CONTEXT)
    assert english.text == "Hi Wanjiku Kamau"
    assert swahili.subject.startswith("Oda")  # the other locale keeps its own
    # Back to the bundled one: real messages follow at once.
    reset = await client.delete(f"{ADMIN}/order.paid.buyer/en", headers=admin.headers)
    assert reset.status_code == 200
    assert await render(runtime, "order.paid.buyer", "en", SAMPLE_CONTEXT) == bundled


async def test_an_override_naming_what_its_message_lacks_is_refused(
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    admin = await make_user(Role.admin)
    path = f"{ADMIN}/seller.approved.seller/en"
    # A store's approval has no order: the override would fail at every sending.
    refused = await client.put(path, json={"source": GOOD}, headers=admin.headers)
    assert refused.status_code == 422, refused.text
    assert refused.json()["type"] == "/problems/notification-template-invalid"
    assert "order" in refused.json()["detail"]
    assert not (await client.get(path, headers=admin.headers)).json()["overridden"]
    preview = await client.post(f"{path}/preview", json={"source": GOOD}, headers=admin.headers)
    assert preview.status_code == 422
    fitting = GOOD.replace("order.number", "store.name")
    assert (
        await client.put(path, json={"source": fitting}, headers=admin.headers)
    ).status_code == 200


@pytest.mark.parametrize("role", [Role.customer, Role.operator, Role.support])
async def test_only_administrators_touch_templates(
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
    role: Role,
) -> None:
    user = await make_user(role)
    assert (await client.get(ADMIN, headers=user.headers)).status_code == 403
    answer = await client.put(
        f"{ADMIN}/order.paid.buyer/en", json={"source": GOOD}, headers=user.headers
    )
    assert answer.status_code == 403
    assert (await client.get(ADMIN)).status_code == 401
