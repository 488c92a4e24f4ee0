"""The providers that carry email and SMS out of Soko, written to their public API docs.

* :class:`SmtpEmail`: any SMTP server through aiosmtplib (STARTTLS, implicit TLS or a
  plain local relay; AUTH when a username is set).
* :class:`SendGridEmail`: SendGrid's v3 Mail Send (``POST /v3/mail/send``, bearer key).
* :class:`AfricasTalkingSms`: Africa's Talking's bulk SMS (``POST /version1/messaging``,
  form-encoded, ``apiKey`` header).
* :class:`TwilioSms`: Twilio's Messages resource
  (``POST /2010-04-01/Accounts/{Sid}/Messages.json``, basic auth).

Each ``deliver`` returns a :class:`Sent` (the provider's message id) or raises one of
three failures, which the delivery job maps onto the delivery record and the outbox:

* :class:`TransientFailure`: try again later (network, timeout, 5xx, 429, a refused
  credential that an operator may fix); counted by the provider's circuit breaker.
* :class:`PermanentFailure`: the provider will never take this message; give up.
* :class:`RecipientRejected`: the address or number itself is invalid or refused it;
  give up and suppress the recipient.

None of the providers takes an idempotency key for a send, so a crash between the
provider's answer and the job's commit sends a message twice; the delivery record's
final status makes every later redelivery a no-op.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import httpx2

from soko.notifications.messages import Email, Sms

ERROR_TEXT_MAX = 300


class DeliveryFailure(Exception):
    """A provider did not take the message. The text names the provider's code and
    reason, never the recipient or the message."""


class TransientFailure(DeliveryFailure):
    """Worth another try later."""


class PermanentFailure(DeliveryFailure):
    """The provider will not take this message, however often it is tried."""


class RecipientRejected(PermanentFailure):
    """The address or number is invalid, does not exist or refuses messages."""


@dataclass(frozen=True, slots=True)
class Sent:
    """The provider took the message; ``provider_message_id`` is its id for it."""

    provider: str
    provider_message_id: str | None
    delivered: bool = False  # the development sink "delivers" at once


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_TEXT_MAX else text[: ERROR_TEXT_MAX - 1] + "…"


def _http_failure(provider: str, response: httpx2.Response, detail: str = "") -> DeliveryFailure:
    status = response.status_code
    message = f"{provider} answered {status}" + (f": {_short(detail)}" if detail else "")
    # 401/403: a credential an operator can fix; 408/409/425/429 and 5xx: try again.
    if status in (401, 403, 408, 409, 425, 429) or status >= 500:
        return TransientFailure(message)
    return PermanentFailure(message)


async def _post(
    provider: str, http: httpx2.AsyncClient, url: str, **kwargs: Any
) -> httpx2.Response:
    try:
        return await http.post(url, **kwargs)
    except httpx2.TimeoutException:
        raise TransientFailure(f"{provider} did not answer in time") from None
    except httpx2.HTTPError as exc:
        raise TransientFailure(f"{provider} could not be reached: {type(exc).__name__}") from None


def _json(response: httpx2.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


# -- email -------------------------------------------------------------------------------------


def _sender(from_setting: str) -> tuple[str, str]:
    name, address = email.utils.parseaddr(from_setting)
    if "@" not in address:
        raise PermanentFailure("SOKO_NOTIFICATIONS_EMAIL_FROM holds no email address")
    return name, address


def mime_message(message: Email, from_setting: str) -> EmailMessage:
    """The MIME form of ``message``: text first, HTML as its alternative; the
    Message-ID carries the notification's id, so the provider's id is ours."""
    name, address = _sender(from_setting)
    mime = EmailMessage()
    mime["From"] = email.utils.formataddr((name, address)) if name else address
    mime["To"] = message.to
    mime["Subject"] = message.subject
    mime["Date"] = email.utils.format_datetime(message.created_at)
    mime["Message-ID"] = message_id_header(message, address)
    mime.set_content(message.text)
    if message.html:
        mime.add_alternative(message.html, subtype="html")
    return mime


def message_id_header(message: Email, sender_address: str) -> str:
    domain = sender_address.rpartition("@")[2] or "soko.invalid"
    return f"<{message.id}@{domain}>"


@functools.cache
def local_hostname() -> str:
    """This host's name for EHLO, looked up once: aiosmtplib would call
    ``socket.getfqdn`` (a DNS round trip, often tens of milliseconds) on every send."""
    return socket.getfqdn() or "localhost"


class SmtpEmail:
    provider = "smtp"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: str,
        username: str,
        password: str,
        sender: str,
        timeout: float,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self.password = password
        self.sender = sender
        self.timeout = timeout
        self.tls_context = tls_context

    async def deliver(self, message: Email) -> Sent:
        if not self.host:
            raise TransientFailure("SOKO_SMTP_HOST is not set")
        mime = mime_message(message, self.sender)
        try:
            await aiosmtplib.send(
                mime,
                hostname=self.host,
                port=self.port,
                username=self.username or None,
                password=self.password or None,
                use_tls=self.security == "tls",
                start_tls=self.security == "starttls",
                tls_context=self.tls_context,
                timeout=self.timeout,
                local_hostname=await asyncio.to_thread(local_hostname),
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refusal.code for refusal in exc.recipients]
            text = f"smtp refused the recipient ({', '.join(map(str, codes))})"
            if codes and all(500 <= code < 600 for code in codes):
                raise RecipientRejected(text) from None
            raise TransientFailure(text) from None
        except aiosmtplib.SMTPResponseException as exc:
            text = f"smtp answered {exc.code}: {_short(exc.message)}"
            if 500 <= exc.code < 600 and exc.code not in (530, 535):
                raise PermanentFailure(text) from None
            raise TransientFailure(text) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientFailure(f"smtp failed: {type(exc).__name__}") from None
        return Sent(self.provider, str(mime["Message-ID"]))


class SendGridEmail:
    """SendGrid v3 Mail Send. The notification's id travels in ``custom_args``, which
    SendGrid echoes in every Event Webhook event, so a report finds its delivery."""

    provider = "sendgrid"

    def __init__(self, http: httpx2.AsyncClient, *, base: str, api_key: str, sender: str) -> None:
        self.http = http
        self.url = base.rstrip("/") + "/v3/mail/send"
        self.api_key = api_key
        self.sender = sender

    def request_body(self, message: Email) -> dict[str, Any]:
        name, address = _sender(self.sender)
        sender: dict[str, str] = {"email": address}
        if name:
            sender["name"] = name
        content = [{"type": "text/plain", "value": message.text}]
        if message.html:
            content.append({"type": "text/html", "value": message.html})
        return {
            "personalizations": [{"to": [{"email": message.to}]}],
            "from": sender,
            "subject": message.subject,
            "content": content,
            "custom_args": {"notification_id": str(message.id)},
            "categories": [message.category],
        }

    async def deliver(self, message: Email) -> Sent:
        if not self.api_key:
            raise TransientFailure("SOKO_SENDGRID_API_KEY is not set")
        response = await _post(
            self.provider,
            self.http,
            self.url,
            json=self.request_body(message),
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        if response.status_code != 202:
            body = _json(response)
            detail = ""
            if isinstance(body, dict) and isinstance(body.get("errors"), list):
                detail = "; ".join(
                    str(error.get("message", ""))
                    for error in body["errors"]
                    if isinstance(error, dict)
                )
            raise _http_failure(self.provider, response, detail)
        return Sent(self.provider, response.headers.get("X-Message-Id"))


# -- SMS ---------------------------------------------------------------------------------------

# Africa's Talking's per-recipient status codes
# (https://developers.africastalking.com/docs/sms/sending/bulk).
AT_ACCEPTED = {100, 101, 102}  # Processed, Sent, Queued
AT_RECIPIENT_REJECTED = {
    403,
    404,
    406,
}  # InvalidPhoneNumber, UnsupportedNumberType, UserInBlacklist


class AfricasTalkingSms:
    provider = "africastalking"

    def __init__(
        self, http: httpx2.AsyncClient, *, base: str, username: str, api_key: str, sender: str
    ) -> None:
        self.http = http
        self.url = base.rstrip("/") + "/version1/messaging"
        self.username = username
        self.api_key = api_key
        self.sender = sender

    def form(self, message: Sms) -> dict[str, str]:
        form = {"username": self.username, "to": message.to, "message": message.body}
        if self.sender:
            form["from"] = self.sender
        return form

    async def deliver(self, message: Sms) -> Sent:
        if not self.username or not self.api_key:
            raise TransientFailure("SOKO_AFRICASTALKING_USERNAME or _API_KEY is not set")
        response = await _post(
            self.provider,
            self.http,
            self.url,
            data=self.form(message),
            headers={"apiKey": self.api_key, "Accept": "application/json"},
        )
        if response.status_code not in (200, 201):
            raise _http_failure(self.provider, response, response.text)
        return self.parse(_json(response))

    def parse(self, body: Any) -> Sent:
        data = body.get("SMSMessageData") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise TransientFailure("africastalking answered without SMSMessageData")
        recipients = data.get("Recipients")
        if not isinstance(recipients, list) or not recipients:
            # No recipient at all: the request was refused as a whole ("InvalidSenderId").
            raise TransientFailure(
                f"africastalking sent to nobody: {_short(str(data.get('Message', '')))}"
            )
        first = recipients[0] if isinstance(recipients[0], dict) else {}
        try:
            code = int(first.get("statusCode", 0))
        except (TypeError, ValueError):
            code = 0
        status = _short(str(first.get("status", "")))
        if code in AT_ACCEPTED:
            message_id = first.get("messageId")
            return Sent(self.provider, str(message_id) if message_id else None)
        text = f"africastalking refused the message: {code} {status}"
        if code in AT_RECIPIENT_REJECTED:
            raise RecipientRejected(text)
        if code == 409:  # DoNotDisturbRejection: the subscriber opted out of this sender
            raise PermanentFailure(text)
        raise TransientFailure(text)  # RiskHold, InvalidSenderId, InsufficientBalance, 5xx...


# Twilio error codes that say the number itself is wrong or refuses messages
# (https://www.twilio.com/docs/api/errors).
TWILIO_RECIPIENT_CODES = {21211, 21214, 21217, 21610, 21612, 21614}


class TwilioSms:
    provider = "twilio"

    def __init__(
        self,
        http: httpx2.AsyncClient,
        *,
        base: str,
        account_sid: str,
        auth_token: str,
        sender: str,
        status_callback: str | None,
    ) -> None:
        self.http = http
        self.url = f"{base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.sender = sender
        self.status_callback = status_callback

    def form(self, message: Sms) -> dict[str, str]:
        form = {"To": message.to, "From": self.sender, "Body": message.body}
        if self.status_callback:
            form["StatusCallback"] = self.status_callback
        return form

    async def deliver(self, message: Sms) -> Sent:
        if not self.account_sid or not self.auth_token or not self.sender:
            raise TransientFailure(
                "SOKO_TWILIO_ACCOUNT_SID, SOKO_TWILIO_AUTH_TOKEN or "
                "SOKO_NOTIFICATIONS_SMS_SENDER is not set"
            )
        response = await _post(
            self.provider,
            self.http,
            self.url,
            data=self.form(message),
            auth=(self.account_sid, self.auth_token),
            headers={"Accept": "application/json"},
        )
        body = _json(response)
        if response.status_code not in (200, 201):
            code = body.get("code") if isinstance(body, Mapping) else None
            detail = f"{code} {body.get('message', '')}" if isinstance(body, Mapping) else ""
            if code in TWILIO_RECIPIENT_CODES:
                raise RecipientRejected(f"twilio refused the number: {_short(detail)}")
            raise _http_failure(self.provider, response, detail)
        if not isinstance(body, Mapping) or not body.get("sid"):
            raise TransientFailure("twilio answered without a message sid")
        if body.get("status") in ("failed", "undelivered"):
            raise PermanentFailure(f"twilio answered {body.get('status')} {body.get('error_code')}")
        return Sent(self.provider, str(body["sid"]))
