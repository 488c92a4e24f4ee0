"""The SSRF guard: which addresses are refused, which URLs, and that a refused address
is never connected to (a real listener on loopback counts the connections)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Sequence

import pytest

from soko.platform.netguard import (
    BlockedAddressError,
    GuardedHttp,
    OutboundHttpError,
    UnsafeUrlError,
    address_refusal,
    check_url,
    system_resolver,
    vetted_addresses,
)
from tests.webhooks.receiver import counting_listener, running_receiver

REFUSED = [
    "0.0.0.0",
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "169.254.1.1",
    "100.64.0.1",  # CGNAT
    "100.100.100.200",  # Alibaba metadata, inside CGNAT
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "198.18.0.1",
    "192.0.2.1",
    "::",
    "::1",
    "fe80::1",
    "fc00::1",
    "fd00:ec2::254",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "2002:a00:1::",  # 6to4 around 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 around 127.0.0.1
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "2001:db8::1",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(address) is None


def test_refusals_say_why() -> None:
    assert address_refusal("127.0.0.1") == "a loopback address"
    assert address_refusal("169.254.169.254") == "a cloud metadata address"
    assert address_refusal("100.64.1.1") == "a shared (CGNAT) address"
    assert address_refusal("::ffff:127.0.0.1") == "an IPv6 form of a loopback address"
    assert address_refusal(ipaddress.ip_address("10.1.2.3")) == "a private address"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/x", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("gopher://example.com", "http or https"),
        ("https://user:pw@example.com/", "user name or password"),
        ("https://example.com@127.0.0.1/", "user name or password"),
        ("https:///nohost", "no host"),
        ("https://example.com/#frag", "fragment"),
        ("https://127.0.0.1/", "loopback"),
        ("https://[::1]:8443/", "loopback"),
        ("https://[::ffff:169.254.169.254]/", "IPv6 form"),
        ("https://10.0.0.7/hook", "private"),
        ("https://localhost/hook", "localhost"),
        ("https://api.localhost/hook", "localhost"),
        ("https://exa mple.com/", "spaces"),
        ("https://example.com:99999/", "valid URL"),
        ("https://example.com:0/", "port 0"),
        ("https://bad_-host-.com/", "invalid host"),
        (" https://example.com/", "spaces"),
        ("https://example.com/" + "a" * 2000, "longer than"),
    ],
)
def test_unsafe_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(UnsafeUrlError, match=why):
        check_url(url, allow_http=True, allow_private=False)


def test_http_needs_permission() -> None:
    with pytest.raises(UnsafeUrlError, match="https"):
        check_url("http://example.com/hook", allow_http=False, allow_private=False)
    target = check_url("http://example.com/hook", allow_http=True, allow_private=False)
    assert (target.scheme, target.host, target.port) == ("http", "example.com", 80)
    assert (
        check_url("https://Example.com:8443/x?y=1", allow_http=False, allow_private=False).port
        == 8443
    )


def test_private_literals_pass_only_when_allowed() -> None:
    target = check_url("http://127.0.0.1:9000/h", allow_http=True, allow_private=True)
    assert (target.host, target.port) == ("127.0.0.1", 9000)


def _resolver(mapping: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    calls: list[str] = []

    async def resolve(host: str, port: int) -> Sequence[str]:
        calls.append(host)
        if host in mapping:
            return mapping[host]
        return await system_resolver(host, port)  # "localhost" as this machine says

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


async def test_a_name_with_one_private_address_is_refused() -> None:
    resolve = _resolver({"mixed.test": ["93.184.215.14", "10.0.0.5"]})
    with pytest.raises(BlockedAddressError, match="private"):
        await vetted_addresses("mixed.test", 443, allow_private=False, resolver=resolve)
    resolve = _resolver({"public.test": ["93.184.215.14", "93.184.215.14"]})
    assert await vetted_addresses("public.test", 443, allow_private=False, resolver=resolve) == [
        ipaddress.ip_address("93.184.215.14")
    ]


async def test_a_name_resolving_to_nothing_is_refused() -> None:
    with pytest.raises(BlockedAddressError, match="no address"):
        await vetted_addresses(
            "empty.test", 443, allow_private=False, resolver=_resolver({"empty.test": []})
        )
    with pytest.raises(BlockedAddressError, match="did not resolve"):
        await vetted_addresses("nonexistent.invalid", 443, allow_private=False)


async def _wait_a_moment() -> None:
    # Give a connection that was (wrongly) made time to be accepted and counted.
    await asyncio.sleep(0.2)


async def test_guard_on_never_connects_to_loopback() -> None:
    with counting_listener() as listener:
        rebinding = _resolver({"hooks.example.test": ["127.0.0.1"]})
        client = GuardedHttp(
            allow_private=False, timeout=2, max_response_bytes=100, resolver=rebinding
        )
        try:
            for url in (
                f"http://127.0.0.1:{listener.port}/x",
                f"http://localhost:{listener.port}/x",
                f"http://hooks.example.test:{listener.port}/x",
                f"http://[::ffff:127.0.0.1]:{listener.port}/x",
            ):
                with pytest.raises(BlockedAddressError):
                    await client.post(url, headers=[], body=b"{}")
        finally:
            await client.aclose()
        await _wait_a_moment()
        assert listener.connections == 0


async def test_the_connection_goes_to_the_vetted_address_only() -> None:
    """DNS rebinding: the name answers differently on a second lookup; the client asks
    once per connection and connects to what it vetted, with the name as Host."""
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])
    looked_up: list[str] = []

    async def rebinding(host: str, port: int) -> Sequence[str]:
        looked_up.append(host)
        return next(answers)

    with running_receiver() as receiver:
        client = GuardedHttp(
            allow_private=True, timeout=5, max_response_bytes=100, resolver=rebinding
        )
        try:
            answer = await client.post(
                f"http://hooks.example.test:{receiver.port}/in", headers=[("X-A", "1")], body=b"hi"
            )
        finally:
            await client.aclose()
    assert answer.status == 200 and answer.body == b"ok"
    assert looked_up == ["hooks.example.test"]
    [request] = receiver.requests
    assert request.headers["host"] == f"hooks.example.test:{receiver.port}"
    assert (request.path, request.body, request.headers["x-a"]) == ("/in", b"hi", "1")


async def test_the_answer_is_read_up_to_the_cap() -> None:
    with running_receiver(answer_body=b"x" * 100_000) as receiver:
        client = GuardedHttp(allow_private=True, timeout=5, max_response_bytes=1000)
        try:
            answer = await client.post(receiver.url, headers=[], body=b"{}")
        finally:
            await client.aclose()
    assert (answer.status, len(answer.body), answer.truncated) == (200, 1000, True)


async def test_redirects_are_answers_not_followed() -> None:
    with counting_listener() as elsewhere, running_receiver(default_status=302) as receiver:
        receiver.answer_body = b""
        client = GuardedHttp(allow_private=True, timeout=5, max_response_bytes=100)
        try:
            answer = await client.post(receiver.url, headers=[], body=b"{}")
        finally:
            await client.aclose()
        await _wait_a_moment()
        assert answer.status == 302
        assert elsewhere.connections == 0
        assert len(receiver.requests) == 1


async def test_a_silent_server_times_out() -> None:
    hold = threading.Event()
    with running_receiver(hold=hold) as receiver:
        client = GuardedHttp(allow_private=True, timeout=0.3, max_response_bytes=100)
        try:
            with pytest.raises(OutboundHttpError, match=r"no answer|timed out"):
                await client.post(receiver.url, headers=[], body=b"{}")
        finally:
            hold.set()
            await client.aclose()


async def test_a_closed_port_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = GuardedHttp(allow_private=True, timeout=2, max_response_bytes=100)
    try:
        with pytest.raises(OutboundHttpError, match="connect"):
            await client.post(f"http://127.0.0.1:{port}/", headers=[], body=b"")
    finally:
        await client.aclose()
