"""Templates are code administrators write, so the sandbox bounds what they may do:
values that would grow past a size are refused before they are made (``*``, ``**``,
``+``, ``%``, ``~``, padding and joining), loops and calls are counted, a rendered part
has a maximum length, and every error a template raises is an invalid template: a 422
on preview and save, a logged fallback to the bundled template when sending."""

from __future__ import annotations

import httpx2
import pytest
from structlog.testing import capture_logs

from soko.identity.models import Role
from soko.notifications.templates import (
    RENDERED_MAX_LENGTH,
    SAMPLE_CONTEXT,
    STEPS_MAX,
    VALUE_MAX_SIZE,
    TemplateProblem,
    bundled_source,
    override_key,
    overrides_changed,
    render,
    render_source,
    store_override,
)
from soko.notifications.triggers import TRIGGERS, _rendered
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser, make_user  # noqa: F401

ADMIN = "/api/v1/admin/notifications/templates"
INVALID = "/problems/notification-template-invalid"
BIG = '{% set big = "x" * 99999 %}'


def with_text(body: str) -> str:
    """A template whose every part is fine but the text, which is ``body``."""
    return (
        "{% block subject %}Order {{ order.number }}{% endblock %}\n"
        "{% block title %}Order {{ order.number }}{% endblock %}\n"
        f"{{% block text %}}{body}{{% endblock %}}\n"
        "{% block html %}<p>Hi {{ recipient.name }}</p>{% endblock %}\n"
    )


def refusal(body: str) -> str:
    """The message the text part is refused with."""
    with pytest.raises(TemplateProblem) as caught:
        render_source(with_text(body), SAMPLE_CONTEXT)
    errors = caught.value.errors
    assert [error["part"] for error in errors] == ["text"], errors
    return errors[0]["message"]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        # Repetition and powers, refused from their operands before anything is built.
        ('{{ "a" * 10**6 }}', "more than 100000 characters"),
        ("{{ [0] * 1000001 }}", "more than 100000 characters or items"),
        ("{{ [[0] * 1000] * 1000 }}", "more than 100000"),  # nested: counted in full
        ("{{ 2 ** 1000000 }}", "a number of more than"),
        ("{% set n = 10 ** 30000 %}{{ n * n * n * n }}", "a number of more than"),
        # Growing a value round after round, with + or ~.
        (
            '{% set ns = namespace(s="ab") %}{% for i in range(40) %}'
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "a string of more than",
        ),
        (
            '{% set ns = namespace(s="ab") %}{% for i in range(40) %}'
            "{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "more than 100000",
        ),
        (
            "{% macro grow(s, n) %}{{ grow(s ~ s, n - 1) if n else s|length }}{% endmacro %}"
            '{{ grow("ab", 40) }}',
            "a string of more than",
        ),
        # Padding and formatting with a huge width.
        ('{{ "x".ljust(10000000) }}', "a width of 10000000"),
        ('{{ "x"|center(10000000) }}', "a width of 10000000"),
        ('{{ "x"|indent(10000000, true) }}', "an indent of 10000000"),
        ('{{ "{:>10000000}".format(1) }}', "a formatted string"),
        ('{{ "{:{}}".format(1, 10000000) }}', "may not come from the arguments"),
        ('{{ "%10000000d" % 1 }}', "a formatted string"),
        ('{{ "%*d" % (10000000, 1) }}', "may not come from the values"),
        ('{{ "%10000000d"|format(1) }}', "a formatted string"),
        # Replacing and joining with large pieces.
        (BIG + '{{ big.replace("x", "yy") }}', "more than 100000"),
        (BIG + '{{ big|replace("x", "yy") }}', "more than 100000"),
        (BIG + '{{ "ab".join([big, big]) }}', "more than 100000"),
        (BIG + "{{ [big, big]|join }}", "more than 100000"),
        (BIG + '{{ big|list|map("center", 99999)|join }}', "more than 100000"),
        ("{{ [1]|batch(10000000, 0)|list }}", "a batch of 10000000"),
        # Loops and calls are counted: nested loops stop long before they finish.
        (
            "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
            f"more than {STEPS_MAX} steps",
        ),
        (
            "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
            "{{ f(40) }}",
            f"more than {STEPS_MAX} steps",
        ),
        # What a loop writes into a {% set %} block counts, though it is never output.
        (
            BIG + "{% set all %}{% for i in range(1000) %}{{ big }}{% endfor %}{% endset %}",
            "characters in all",
        ),
        # A rendered part has a maximum length.
        (BIG + "{{ big }}{{ big }}", f"longer than {RENDERED_MAX_LENGTH} characters"),
        # Python's and Jinja's own errors are the template's too.
        ("{% for x in range(10**8) %}{% endfor %}", "OverflowError: Range too big"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ('{{ "%d" % "x" }}', "TypeError"),
        ('{{ "abc".index("z") }}', "ValueError"),
        ("{{ 10 ** 5000 }}", "ValueError"),  # more digits than Python prints
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{{ order.no_such_field }}", "UndefinedError"),
        ("{{ lipsum(10000) }}", "UndefinedError"),
        # The sample data is shared: a template may not change it.
        ("{{ app.clear() }}", "SecurityError"),
        ("{% set l = [] %}{{ l.append(1) }}", "SecurityError"),
    ],
)
def test_a_template_over_the_limits_is_invalid(body: str, why: str) -> None:
    assert why in refusal(body)


def test_the_sample_data_is_left_as_it_was() -> None:
    refusal("{{ app.clear() }}{{ order.pop('number') }}")
    assert SAMPLE_CONTEXT["app"] == {"name": "Soko", "url": "https://soko.example"}
    assert SAMPLE_CONTEXT["order"]["number"] == "SK-20300101-0001"


def test_recursive_loops_are_refused_when_compiled() -> None:
    # Their rounds could not be counted. Like a syntax error, it fails every part.
    with pytest.raises(TemplateProblem) as caught:
        render_source(with_text("{% for x in [1] recursive %}{% endfor %}"), SAMPLE_CONTEXT)
    assert "recursive loops are not allowed" in caught.value.errors[0]["message"]


def test_messages_are_kept_short() -> None:
    message = refusal('{{ order["k" * 5000] }}')  # the error quotes the whole name
    assert message.startswith("UndefinedError") and len(message) <= 300


def test_what_a_message_needs_still_renders() -> None:
    body = (
        "{% set items = [{'name': 'Unga', 'qty': 2, 'price': 12000}, "
        "{'name': 'Sukari', 'qty': 1, 'price': 5000}] %}"
        "{% set ns = namespace(total=0) %}"
        "{% for item in items %}{{ loop.index }}. {{ item.name|upper }} x{{ item.qty }}; "
        "{% set ns.total = ns.total + item.qty * item.price %}{% endfor %}"
        "{{ ns.total|money('KES') }} VAT {{ (order.total_minor * 0.16)|round|int }} "
        '{{ "-" * 10 }} {{ "{:,}".format(order.total_minor) }} {{ "%05d" % 42 }} '
        "{{ recipient.name ~ '!' }} {{ ', '.join(['a', 'b']) }} {{ 2 ** 10 }}"
    )
    rendered = render_source(with_text(body), SAMPLE_CONTEXT)
    assert rendered.text == (
        "1. UNGA x2; 2. SUKARI x1; KES 290.00 VAT 40000 ---------- 250,000 00042 "
        "Wanjiku Kamau! a, b 1024"
    )
    # A value as large as allowed is allowed, and so is a part as long as allowed.
    exactly = render_source(with_text(f'{{{{ "y" * {VALUE_MAX_SIZE} }}}}'), SAMPLE_CONTEXT)
    assert len(exactly.text) == VALUE_MAX_SIZE == RENDERED_MAX_LENGTH


def test_html_concatenation_still_escapes_what_is_not_safe() -> None:
    source = with_text("t").replace(
        "<p>Hi {{ recipient.name }}</p>", "{{ ('<b>' | safe) ~ recipient.name ~ '<i>' }}"
    )
    context = {**SAMPLE_CONTEXT, "recipient": {"name": "<script>"}}
    assert render_source(source, context).html == "<b>&lt;script&gt;&lt;i&gt;"


# -- over HTTP: preview and save answer 422 ----------------------------------------------------

AUDITED = [
    '{{ "a"*10**9 }}',  # took more than 4 GB and stopped the process answering
    "{% for x in range(10**8) %}{% endfor %}",  # answered 500
    "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
    '{{ "x"|center(10**9) }}',
]


@pytest.mark.parametrize("body", AUDITED)
async def test_preview_and_save_refuse_a_template_over_the_limits(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
    body: str,
) -> None:
    admin = await make_user(Role.admin)
    path = f"{ADMIN}/order.paid.buyer/en"
    source = with_text(body)

    preview = await client.post(f"{path}/preview", json={"source": source}, headers=admin.headers)
    assert preview.status_code == 422, preview.text
    assert preview.json()["type"] == INVALID
    assert preview.json()["errors"][0]["part"] == "text"

    saved = await client.put(path, json={"source": source}, headers=admin.headers)
    assert saved.status_code == 422, saved.text
    assert saved.json()["type"] == INVALID
    stored = (await client.get(path, headers=admin.headers)).json()
    assert not stored["overridden"] and stored["source"] == bundled_source("order.paid.buyer", "en")


async def test_preview_data_cannot_push_a_template_over_the_limits(
    client: httpx2.AsyncClient,
    make_user: MakeUser,  # noqa: F811
) -> None:
    admin = await make_user(Role.admin)
    answer = await client.post(
        f"{ADMIN}/order.paid.buyer/en/preview",
        json={"source": with_text("{{ recipient.name * 100000 }}"), "data": {}},
        headers=admin.headers,
    )
    assert answer.status_code == 422 and answer.json()["type"] == INVALID


# -- sending: a stored override over the limits falls back to the bundled template -------------


async def test_sending_with_an_override_over_the_limits_falls_back_and_logs(
    runtime: Runtime,
) -> None:
    # Saved before the limits existed (the API refuses it now): stored directly.
    trigger = next(t for t in TRIGGERS if t.template == "order.paid.buyer")
    source = with_text(BIG + "{{ big * 1000 }}")
    async with runtime.db.transaction() as session:
        await store_override(
            session, override_key(trigger.template, "en"), source, None, runtime.clock.now()
        )
        overrides_changed(session)

    with pytest.raises(TemplateProblem):
        await render(runtime, trigger.template, "en", SAMPLE_CONTEXT)
    with capture_logs() as logs:
        rendered = await _rendered(runtime, trigger, "en", SAMPLE_CONTEXT)
    bundled = render_source(bundled_source(trigger.template, "en") or "", SAMPLE_CONTEXT)
    assert rendered == bundled
    failures = [entry for entry in logs if entry["event"] == "template failed to render"]
    assert failures and failures[0]["template"] == trigger.template
    assert "more than 100000" in failures[0]["errors"][0]["message"]
