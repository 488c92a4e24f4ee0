"""One walk through every identity flow that handles personal data or secrets, over HTTP,
remembering everything a leak would show: emails, phone numbers, passwords, tokens,
codes, authenticator secrets, recovery codes, API keys. The data-at-rest and log hygiene
tests look for each of them where none may appear."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
import phonenumbers

from soko.identity.accounts import create_user
from soko.identity.models import Role
from soko.identity.passwords import password_hasher
from soko.notifications.public import read_sink
from soko.platform.clock import ManualClock
from soko.platform.otp import decode_secret, totp
from soko.platform.runtime import Runtime

AUTH = "/api/v1/auth"
ME = "/api/v1/me"
PHONE_UA = "Mozilla/5.0 (Linux; Android 14; TECNO KI5) Chrome/130.0 Mobile"
SIX_DIGITS = re.compile(r"\b(\d{6})\b")
LINK_TOKEN = re.compile(r"/(?:verify-email|reset-password)\?token=([A-Za-z0-9_\-]+)")


@dataclass
class Exposure:
    """Everything the walk handled that must never be stored or logged in clear."""

    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)  # E.164
    passwords: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # access, refresh, challenge, links
    codes: list[str] = field(default_factory=list)  # SMS and TOTP codes, six digits
    totp_secrets: list[str] = field(default_factory=list)
    recovery_codes: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    display_names: list[str] = field(default_factory=list)  # stored in clear, by design

    def personal_data(self) -> list[str]:
        """Every spelling of every email and phone number that must not appear."""
        spelled: list[str] = []
        for email in self.emails:
            local, _, _ = email.rpartition("@")
            spelled += [email, email.lower(), local, local.lower()]
        for e164 in self.phones:
            number = phonenumbers.parse(e164)
            national = str(number.national_number)
            national_form = phonenumbers.format_number(
                number, phonenumbers.PhoneNumberFormat.NATIONAL
            )
            spelled += [
                e164,
                e164.removeprefix("+"),
                national_form,
                national_form.replace(" ", ""),
                phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL),
                national,  # the national significant number, inside every other form
            ]
        return sorted(set(spelled))

    def secrets(self) -> list[str]:
        """Long secrets: passwords, tokens, authenticator secrets, recovery codes, keys."""
        return sorted(
            {
                *self.passwords,
                *self.tokens,
                *self.totp_secrets,
                *self.recovery_codes,
                *self.api_keys,
            }
        )


def _json(answer: httpx2.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": PHONE_UA}


def _advance(runtime: Runtime, seconds: float) -> None:
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    clock.advance(dt.timedelta(seconds=seconds))


async def _delivered(runtime: Runtime, kind: str, to: str) -> list[dict[str, Any]]:
    await runtime.dispatcher.run_until_idle()
    return [m for m in read_sink(runtime.settings.data_dir, kind) if m["to"] == to]


def _keep_pair(exposure: Exposure, pair: dict[str, Any]) -> dict[str, Any]:
    exposure.tokens += [pair["access_token"], pair["refresh_token"]]
    return pair


@asynccontextmanager
async def client_from(app: Any, ip: str) -> AsyncIterator[httpx2.AsyncClient]:
    """A client whose requests come from ``ip`` (the login limit counts per address)."""
    transport = httpx2.ASGITransport(app=app, client=(ip, 40_000))
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def walk_every_flow(app: Any, runtime: Runtime) -> Exposure:
    """Sign up, sign in (right and wrong), refresh, SMS codes, MFA enrollment and
    challenge, password reset, email verification, API keys, sign out."""
    async with client_from(app, "197.248.1.10") as first, client_from(app, "41.90.2.20") as second:
        return await _walk(first, second, runtime)


async def _walk(
    client: httpx2.AsyncClient, other: httpx2.AsyncClient, runtime: Runtime
) -> Exposure:
    tag = uuid.uuid4().hex[:8]
    seen = Exposure()
    email = f"Nyokabi.Kamau-{tag}@Example.com"
    password = f"jacaranda-blooms-{tag}"
    wrong_password = f"jacaranda-wilts-{tag}"
    new_password = f"acacia-thorn-shade-{tag}"
    display_name = f"Nyokabi {tag}"
    seen.emails.append(email)
    seen.passwords += [password, wrong_password, new_password]
    seen.display_names.append(display_name)

    # Sign up with an email and a password; the verification link comes by email.
    registered = _keep_pair(
        seen,
        _json(
            await client.post(
                f"{AUTH}/register",
                json={"email": email, "password": password, "display_name": display_name},
                headers={"User-Agent": PHONE_UA},
            ),
            201,
        ),
    )
    me = _json(await client.get(ME, headers=_bearer(registered["access_token"])), 200)
    assert me["email"] == email.lower()
    mails = await _delivered(runtime, "email", email.lower())
    verification = LINK_TOKEN.findall(mails[-1]["text"])
    assert len(verification) == 1
    seen.tokens += verification
    answer = await client.post(f"{AUTH}/email/verify", json={"token": verification[0]})
    assert answer.status_code == 204, answer.text

    # A wrong password, then the right one after the throttle's wait.
    login = {"identifier": email, "password": wrong_password}
    assert (await client.post(f"{AUTH}/login", json=login)).status_code == 401
    unknown = f"nobody-{tag}@example.org"
    seen.emails.append(unknown)
    answer = await client.post(f"{AUTH}/login", json={"identifier": unknown, "password": password})
    assert answer.status_code == 401, answer.text
    _advance(runtime, 120)
    signed_in = _keep_pair(
        seen,
        _json(
            await client.post(
                f"{AUTH}/login",
                json={"identifier": email, "password": password},
                headers={"User-Agent": PHONE_UA},
            ),
            200,
        ),
    )

    # Refresh.
    refreshed = _keep_pair(
        seen,
        _json(
            await client.post(
                f"{AUTH}/refresh", json={"refresh_token": signed_in["refresh_token"]}
            ),
            200,
        ),
    )
    headers = _bearer(refreshed["access_token"])

    # An API key.
    created = _json(
        await client.post(
            f"{ME}/api-keys",
            json={"name": "shop sync", "permissions": ["account:self"]},
            headers=headers,
        ),
        201,
    )
    seen.api_keys.append(created["key"])

    # Two-factor sign-in: enroll, confirm, then sign in with a code and a recovery code.
    enrollment = _json(await client.post(f"{ME}/mfa/totp", headers=headers), 201)
    seen.totp_secrets.append(enrollment["secret"])
    seen.tokens.append(enrollment["otpauth_uri"])
    secret = decode_secret(enrollment["secret"])
    code = totp(secret, runtime.clock.now())
    seen.codes.append(code)
    confirmed = _json(
        await client.post(f"{ME}/mfa/totp/confirm", json={"code": code}, headers=headers), 200
    )
    seen.recovery_codes += confirmed["recovery_codes"]
    for proof in ("code", "recovery_code"):
        _advance(runtime, 30)
        challenge = _json(
            await client.post(f"{AUTH}/login", json={"identifier": email, "password": password}),
            200,
        )
        assert challenge["mfa_required"] is True
        seen.tokens.append(challenge["challenge_token"])
        if proof == "code":
            value = totp(secret, runtime.clock.now())
            seen.codes.append(value)
        else:
            value = confirmed["recovery_codes"][0]
        _keep_pair(
            seen,
            _json(
                await client.post(
                    f"{AUTH}/mfa/verify",
                    json={"challenge_token": challenge["challenge_token"], proof: value},
                ),
                200,
            ),
        )

    # Sign out, then a forgotten password and its reset link.
    answer = await client.post(
        f"{AUTH}/logout", json={"refresh_token": refreshed["refresh_token"]}, headers=headers
    )
    assert answer.status_code == 204, answer.text
    answer = await client.post(f"{AUTH}/password/forgot", json={"identifier": email})
    assert answer.status_code == 202, answer.text
    reset_mail = [
        m for m in await _delivered(runtime, "email", email.lower()) if "reset" in m["text"]
    ]
    reset = LINK_TOKEN.findall(reset_mail[-1]["text"])
    seen.tokens += reset
    answer = await client.post(
        f"{AUTH}/password/reset", json={"token": reset[0], "new_password": new_password}
    )
    assert answer.status_code == 204, answer.text

    # Sign up by phone with an SMS code (the number in national form), a wrong guess first.
    phone = f"+25471{int(tag, 16) % 10_000_000:07d}"
    national = phonenumbers.format_number(
        phonenumbers.parse(phone), phonenumbers.PhoneNumberFormat.NATIONAL
    )
    seen.phones.append(phone)
    client = other  # the first address has used its sign-in attempts for this minute
    asked = await client.post(
        f"{AUTH}/otp/request", json={"phone": national, "default_region": "KE"}
    )
    assert asked.status_code == 202, asked.text
    texts = await _delivered(runtime, "sms", phone)
    found = SIX_DIGITS.search(texts[-1]["body"])
    assert found is not None
    sms_code = found.group(1)
    wrong = f"{(int(sms_code) + 1) % 1_000_000:06d}"
    seen.codes += [sms_code, wrong]
    answer = await client.post(f"{AUTH}/otp/verify", json={"phone": phone, "code": wrong})
    assert answer.status_code == 400, answer.text
    _keep_pair(
        seen,
        _json(
            await client.post(
                f"{AUTH}/otp/verify",
                json={
                    "phone": national,
                    "default_region": "KE",
                    "code": sms_code,
                    "display_name": "Otieno",
                },
            ),
            201,
        ),
    )

    # An account with both, signing in by phone number and password.
    both_email = f"achieng.{tag}@example.net"
    both_phone = f"+25472{int(tag, 16) % 10_000_000:07d}"
    seen.emails.append(both_email)
    seen.phones.append(both_phone)
    async with runtime.db.transaction() as session:
        await create_user(
            session,
            runtime.data_keys,
            now=runtime.clock.now(),
            email=both_email,
            phone=both_phone,
            display_name="Achieng",
            password_hash=await password_hasher(runtime).hash(password),
            roles=(Role.seller,),
        )
    _keep_pair(
        seen,
        _json(
            await client.post(
                f"{AUTH}/login", json={"identifier": both_phone, "password": password}
            ),
            200,
        ),
    )
    return seen
