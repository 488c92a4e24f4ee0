"""The providers' exchanges, request by request, as their public API docs describe them;
SMTP against a real local server (aiosmtpd)."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx2
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from soko.notifications.messages import Email, Sms
from soko.notifications.providers import (
    AfricasTalkingSms,
    PermanentFailure,
    RecipientRejected,
    SendGridEmail,
    SmtpEmail,
    TransientFailure,
    TwilioSms,
)
from soko.platform.ids import uuid7

NOW = dt.datetime(2030, 1, 1, 8, 30, tzinfo=dt.UTC)
PHONE = "+254712345678"


def _sms(body: str = "Soko: order SK-1 is paid.") -> Sms:
    return Sms(id=uuid7(), created_at=NOW, category="transactional.order", to=PHONE, body=body)


def _email(html: str | None = "<p>Habari</p>") -> Email:
    return Email(
        id=uuid7(),
        created_at=NOW,
        category="transactional.order",
        to="amina@example.co.ke",
        subject="Order SK-1 is paid",
        text="Habari Amina",
        html=html,
    )


Handler = Callable[[httpx2.Request], httpx2.Response]


class Recorder:
    def __init__(self, answer: Handler) -> None:
        self.requests: list[httpx2.Request] = []
        self.answer = answer

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return self.answer(request)

    def client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.MockTransport(self))


def _form(request: httpx2.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode(), keep_blank_values=True)


# -- Africa's Talking ------------------------------------------------------------------------

AT_SENT = {
    "SMSMessageData": {
        "Message": "Sent to 1/1 Total Cost: KES 0.8000",
        "Recipients": [
            {
                "statusCode": 101,
                "number": PHONE,
                "status": "Success",
                "cost": "KES 0.8000",
                "messageId": "ATXid_4b6c0b0e8f2b4b8d",
            }
        ],
    }
}


async def test_africastalking_posts_the_documented_form() -> None:
    recorder = Recorder(lambda request: httpx2.Response(201, json=AT_SENT))
    async with recorder.client() as http:
        channel = AfricasTalkingSms(
            http,
            base="https://api.africastalking.com",
            username="soko",
            api_key="atsk_secret",
            sender="SOKO",
        )
        message = _sms()
        sent = await channel.deliver(message)
    assert (sent.provider, sent.provider_message_id) == ("africastalking", "ATXid_4b6c0b0e8f2b4b8d")
    [request] = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == "https://api.africastalking.com/version1/messaging"
    assert request.headers["apiKey"] == "atsk_secret"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert _form(request) == {
        "username": ["soko"],
        "to": [PHONE],
        "message": [message.body],
        "from": ["SOKO"],
    }


@pytest.mark.parametrize(
    ("status_code", "status", "failure"),
    [
        (403, "InvalidPhoneNumber", RecipientRejected),
        (406, "UserInBlacklist", RecipientRejected),
        (409, "DoNotDisturbRejection", PermanentFailure),
        (405, "InsufficientBalance", TransientFailure),
        (500, "InternalServerError", TransientFailure),
    ],
)
async def test_africastalking_recipient_statuses(
    status_code: int, status: str, failure: type[Exception]
) -> None:
    body = {
        "SMSMessageData": {
            "Message": "Sent to 0/1",
            "Recipients": [
                {"statusCode": status_code, "number": PHONE, "status": status, "cost": "0"}
            ],
        }
    }
    recorder = Recorder(lambda request: httpx2.Response(201, json=body))
    async with recorder.client() as http:
        channel = AfricasTalkingSms(
            http, base="https://api.africastalking.com", username="soko", api_key="k", sender=""
        )
        with pytest.raises(failure) as caught:
            await channel.deliver(_sms())
    assert PHONE not in str(caught.value)
    assert "from" not in _form(recorder.requests[0])  # no sender id: the account's default


async def test_africastalking_refused_credentials_and_outages_are_transient() -> None:
    answers = iter(
        [
            httpx2.Response(401, text="The supplied authentication is invalid"),
            httpx2.Response(503, text="busy"),
        ]
    )
    recorder = Recorder(lambda request: next(answers))
    async with recorder.client() as http:
        channel = AfricasTalkingSms(
            http, base="https://api.africastalking.com", username="soko", api_key="k", sender=""
        )
        for _ in range(2):
            with pytest.raises(TransientFailure):
                await channel.deliver(_sms())

    def timeout(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectTimeout("slow", request=request)

    async with Recorder(timeout).client() as http:
        channel = AfricasTalkingSms(
            http, base="https://api.africastalking.com", username="soko", api_key="k", sender=""
        )
        with pytest.raises(TransientFailure, match="did not answer in time"):
            await channel.deliver(_sms())


# -- Twilio ------------------------------------------------------------------------------------

ACCOUNT = "AC0123456789abcdef0123456789abcdef"


async def test_twilio_posts_the_documented_form_with_basic_auth() -> None:
    answer = {"sid": "SM8f1e2d3c4b5a69788796a5b4c3d2e1f0", "status": "queued", "to": PHONE}
    recorder = Recorder(lambda request: httpx2.Response(201, json=answer))
    async with recorder.client() as http:
        channel = TwilioSms(
            http,
            base="https://api.twilio.com",
            account_sid=ACCOUNT,
            auth_token="tok",
            sender="+15005550006",
            status_callback="https://soko.example/api/v1/notifications/callbacks/twilio",
        )
        message = _sms()
        sent = await channel.deliver(message)
    assert sent.provider_message_id == "SM8f1e2d3c4b5a69788796a5b4c3d2e1f0"
    [request] = recorder.requests
    assert str(request.url) == (
        f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    )
    expected_auth = base64.b64encode(f"{ACCOUNT}:tok".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected_auth}"
    assert _form(request) == {
        "To": [PHONE],
        "From": ["+15005550006"],
        "Body": [message.body],
        "StatusCallback": ["https://soko.example/api/v1/notifications/callbacks/twilio"],
    }


@pytest.mark.parametrize(
    ("status", "body", "failure"),
    [
        (
            400,
            {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400},
            RecipientRejected,
        ),
        (
            400,
            {"code": 21614, "message": "'To' number is not a valid mobile number"},
            RecipientRejected,
        ),
        (
            400,
            {"code": 21408, "message": "Permission to send an SMS has not been enabled"},
            PermanentFailure,
        ),
        (429, {"code": 20429, "message": "Too Many Requests"}, TransientFailure),
        (500, {"code": 20500, "message": "Internal Server Error"}, TransientFailure),
    ],
)
async def test_twilio_errors(status: int, body: dict[str, Any], failure: type[Exception]) -> None:
    recorder = Recorder(lambda request: httpx2.Response(status, json=body))
    async with recorder.client() as http:
        channel = TwilioSms(
            http,
            base="https://api.twilio.com",
            account_sid=ACCOUNT,
            auth_token="tok",
            sender="+15005550006",
            status_callback=None,
        )
        with pytest.raises(failure):
            await channel.deliver(_sms())
    assert "StatusCallback" not in _form(recorder.requests[0])


# -- SendGrid ----------------------------------------------------------------------------------


async def test_sendgrid_posts_the_documented_mail_send_body() -> None:
    recorder = Recorder(
        lambda request: httpx2.Response(202, headers={"X-Message-Id": "14c5d75ce93.dfd.64b469"})
    )
    async with recorder.client() as http:
        channel = SendGridEmail(
            http,
            base="https://api.sendgrid.com",
            api_key="SG.secret",
            sender="Soko Market <no-reply@soko.example>",
        )
        message = _email()
        sent = await channel.deliver(message)
    assert (sent.provider, sent.provider_message_id) == ("sendgrid", "14c5d75ce93.dfd.64b469")
    [request] = recorder.requests
    assert str(request.url) == "https://api.sendgrid.com/v3/mail/send"
    assert request.headers["Authorization"] == "Bearer SG.secret"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "personalizations": [{"to": [{"email": "amina@example.co.ke"}]}],
        "from": {"email": "no-reply@soko.example", "name": "Soko Market"},
        "subject": "Order SK-1 is paid",
        "content": [
            {"type": "text/plain", "value": "Habari Amina"},
            {"type": "text/html", "value": "<p>Habari</p>"},
        ],
        "custom_args": {"notification_id": str(message.id)},
        "categories": ["transactional.order"],
    }


async def test_sendgrid_without_html_and_its_errors() -> None:
    answers = iter(
        [
            httpx2.Response(400, json={"errors": [{"message": "Invalid email", "field": "to"}]}),
            httpx2.Response(429, json={"errors": [{"message": "too many"}]}),
            httpx2.Response(401, json={"errors": [{"message": "bad key"}]}),
        ]
    )
    recorder = Recorder(lambda request: next(answers))
    async with recorder.client() as http:
        channel = SendGridEmail(
            http, base="https://api.sendgrid.com", api_key="k", sender="no-reply@soko.example"
        )
        with pytest.raises(PermanentFailure, match="Invalid email"):
            await channel.deliver(_email(html=None))
        body = json.loads(recorder.requests[0].content)
        assert body["content"] == [{"type": "text/plain", "value": "Habari Amina"}]
        assert body["from"] == {"email": "no-reply@soko.example"}
        with pytest.raises(TransientFailure):
            await channel.deliver(_email())
        with pytest.raises(TransientFailure):
            await channel.deliver(_email())


# -- SMTP --------------------------------------------------------------------------------------


class Inbox:
    def __init__(self, refuse: set[str] | None = None) -> None:
        self.messages: list[tuple[Envelope, Message]] = []
        self.refuse = refuse or set()
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append((envelope, message_from_bytes(envelope.content)))
        return "250 Message accepted for delivery"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def smtp_server() -> AsyncIterator[tuple[Inbox, int]]:
    inbox = Inbox(refuse={"nobody@example.co.ke"})
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def _smtp(port: int) -> SmtpEmail:
    return SmtpEmail(
        host="127.0.0.1",
        port=port,
        security="none",
        username="",
        password="",
        sender="Soko <no-reply@soko.example>",
        timeout=5,
    )


async def test_smtp_sends_text_and_html_alternatives(smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    message = _email()
    sent = await _smtp(port).deliver(message)
    assert sent.provider == "smtp"
    assert sent.provider_message_id == f"<{message.id}@soko.example>"
    [(envelope, received)] = inbox.messages
    assert envelope.mail_from == "no-reply@soko.example"
    assert envelope.rcpt_tos == ["amina@example.co.ke"]
    assert received["Subject"] == "Order SK-1 is paid"
    assert received["From"] == "Soko <no-reply@soko.example>"
    assert received["Message-ID"] == f"<{message.id}@soko.example>"
    assert received.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in received.walk()][1:]
    assert parts == ["text/plain", "text/html"]


async def test_smtp_refused_recipient_and_unreachable_server(
    smtp_server: tuple[Inbox, int],
) -> None:
    inbox, port = smtp_server
    refused = Email(
        id=uuid7(),
        created_at=NOW,
        category="x.y",
        to="nobody@example.co.ke",
        subject="Hi",
        text="Hello",
    )
    with pytest.raises(RecipientRejected, match="550"):
        await _smtp(port).deliver(refused)
    assert inbox.messages == []
    with pytest.raises(TransientFailure):
        await _smtp(_free_port()).deliver(_email())  # nothing listens there


# -- SMTP with STARTTLS, implicit TLS and AUTH ---------------------------------------------------


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts exactly it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Accounts:
    def __init__(self) -> None:
        self.logins: list[str] = []

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"soko",
            b"s3cret",
        )
        if ok:
            self.logins.append(mechanism)
        return AuthResult(success=ok)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_smtp_over_tls_with_auth(tmp_path: Path, security: str) -> None:
    cert, key = _certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    inbox, accounts, port = Inbox(), Accounts(), _free_port()
    options: dict[str, Any] = {"authenticator": accounts, "auth_required": True}
    if security == "starttls":
        controller = Controller(
            inbox,
            hostname="127.0.0.1",
            port=port,
            server_hostname="smtp.test",
            tls_context=server_context,
            require_starttls=True,
            **options,
        )
    else:
        controller = Controller(
            inbox,
            hostname="127.0.0.1",
            port=port,
            server_hostname="smtp.test",
            ssl_context=server_context,
            auth_require_tls=False,  # the whole connection is TLS already
            **options,
        )
    controller.start()
    try:

        def channel(password: str, context: ssl.SSLContext | None) -> SmtpEmail:
            return SmtpEmail(
                host="127.0.0.1",
                port=port,
                security=security,
                username="soko",
                password=password,
                sender="no-reply@soko.example",
                timeout=5,
                tls_context=context,
            )

        await channel("s3cret", client_context).deliver(_email())
        assert len(inbox.messages) == 1 and accounts.logins
        with pytest.raises(TransientFailure):  # a certificate the client does not trust
            await channel("s3cret", None).deliver(_email())
        assert len(inbox.messages) == 1
    finally:
        controller.stop()
