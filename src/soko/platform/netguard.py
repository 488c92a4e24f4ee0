"""Outbound HTTP to addresses that users chose (webhook endpoints): the SSRF guard.

A URL typed by a seller must never make the server call its own network: the database,
Redis, the cloud's metadata service, an admin port on loopback. The guard works on
addresses, not names, because a name can resolve anywhere:

* :func:`address_refusal` says why an IP address may not be called, or ``None``:
  unspecified, loopback, private (RFC 1918, unique-local), link-local (which holds the
  cloud metadata service at 169.254.169.254), multicast, reserved, shared address space
  (CGNAT, 100.64.0.0/10), benchmarking and documentation ranges, and anything else that
  is not globally routable. IPv6 forms that embed an IPv4 address (IPv4-mapped
  ``::ffff:a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) are judged by the IPv4
  address they carry.
* :func:`check_url` refuses what is not an absolute http(s) URL with a host, carries
  credentials, or uses http where https is required; it also refuses IP literals the
  guard would refuse, so an endpoint is rejected at registration already. That includes
  the legacy numeric spellings the resolver accepts (``2130706433``, ``127.1``,
  ``0x7f000001``, ``0177.0.0.1``), which name an address just as ``127.0.0.1`` does.
* :class:`GuardedHttp` sends a request: it resolves the host itself, refuses the request
  unless *every* address the name resolves to is allowed, and connects to the vetted
  address. The connection is pinned to that address (the name is not resolved again by
  anything else), so DNS rebinding cannot swap it between the check and the connect.
  TLS still verifies the certificate for the host name. Redirects are never followed: a
  3xx answer is just an answer. At most ``max_response_bytes`` of the body are read.

``allow_private`` turns the address check off, for local development and tests that run
a receiver on 127.0.0.1. The ``resolver`` argument is the test hook for DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import httpcore2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Addresses of cloud metadata services that are not already link-local or private
#: (listed so that the refusal names them; the ranges above refuse them too).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    }
)
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
URL_MAX_LENGTH = 2000


class UnsafeUrlError(ValueError):
    """The URL is not one the server may call; the message says why."""


class BlockedAddressError(Exception):
    """The host resolved to an address the guard refuses (or to none); nothing was sent."""


class OutboundHttpError(Exception):
    """The request failed on the way: connect, TLS, timeout, a broken answer."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress | str) -> str | None:
    """Why ``address`` may not be called, or ``None`` when it is a public address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "a scoped IPv6 address"
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner = address_refusal(embedded)
            return f"an IPv6 form of {inner}" if inner else None
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT:
        return "a shared (CGNAT) address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "an address that is not publicly routable"
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: what to connect to and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int


def check_url(url: str, *, allow_http: bool, allow_private: bool) -> Target:
    """``url`` checked for calling: absolute http(s) with a host, no credentials, https
    unless ``allow_http``, no fragment, and (unless ``allow_private``) not an IP literal
    the guard refuses, however it is spelled. Names are resolved only when sending: see
    :class:`GuardedHttp`."""
    if len(url) > URL_MAX_LENGTH:
        raise UnsafeUrlError(f"is longer than {URL_MAX_LENGTH} characters")
    if url != url.strip() or any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise UnsafeUrlError("contains spaces or control characters")
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrlError(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeUrlError("must be an http or https URL")
    if scheme == "http" and not allow_http:
        raise UnsafeUrlError("must use https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UnsafeUrlError("must not carry a user name or password")
    if parts.fragment:
        raise UnsafeUrlError("must not have a fragment")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UnsafeUrlError("has no host")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = _legacy_ipv4(host)
    if literal is None:
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            if not allow_private:
                raise UnsafeUrlError("names this machine (localhost)")
        elif not _looks_like_host_name(host):
            raise UnsafeUrlError("has an invalid host name")
    if literal is not None and not allow_private:
        refusal = address_refusal(literal)
        if refusal is not None:
            raise UnsafeUrlError(f"points to {refusal}")
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0:
        raise UnsafeUrlError("has port 0")
    return Target(url=url, scheme=scheme, host=host, port=port)


# What inet_aton may read as an address: digits, hex digits, the "0x" prefix and dots.
_NUMERIC_HOST = re.compile(r"[0-9a-fx.]+", re.ASCII | re.IGNORECASE)


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``host`` names when written in a form :mod:`ipaddress` refuses
    but the system resolver still reads as an address (it parses with ``inet_aton``):
    one number for the whole address (``2130706433``), fewer than four parts
    (``127.1``), hexadecimal (``0x7f000001``) or octal (``0177.0.0.1``) parts; else
    ``None``. The host is also read after IDNA mapping, so a spelling with full-width
    digits or ideographic dots is caught too. A host that only looks numeric
    (``1.2.3.4.5``, ``08.1.1.1``) is no address and is left to be checked as a name.
    """
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    if not _NUMERIC_HOST.fullmatch(ascii_host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(ascii_host))
    except (OSError, ValueError):
        return None


def _looks_like_host_name(host: str) -> bool:
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        return False
    if len(encoded) > 253:
        return False
    labels = encoded.split(b".")
    return all(
        0 < len(label) <= 63
        and not label.startswith(b"-")
        and not label.endswith(b"-")
        and all(chr(c).isalnum() or c in b"-_" for c in label)
        for label in labels
    )


Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operating system resolves ``host`` to (TCP)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BlockedAddressError(f"the host name did not resolve ({exc.strerror})") from None
    return [str(info[4][0]) for info in infos]


async def vetted_addresses(
    host: str, port: int, *, allow_private: bool, resolver: Resolver = system_resolver
) -> list[IPAddress]:
    """The addresses ``host`` resolves to, all of them allowed; else
    :class:`BlockedAddressError`. One refused address refuses the name: a name that
    answers with a public and a private address is an attack or a mistake."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    raw = [str(literal)] if literal is not None else list(await resolver(host, port))
    addresses: list[IPAddress] = []
    for text in raw:
        try:
            # getaddrinfo may append a scope ("fe80::1%eth0"), which is refused below.
            address = ipaddress.ip_address(text)
        except ValueError:
            raise BlockedAddressError(
                "the host resolved to something that is not an address"
            ) from None
        if not allow_private:
            refusal = address_refusal(address)
            if refusal is not None:
                raise BlockedAddressError(f"the host resolves to {refusal}")
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise BlockedAddressError("the host name resolved to no address")
    return addresses


class _PinnedBackend(httpcore2.AsyncNetworkBackend):
    """Connects where the guard allows: the host is resolved here, once, every address
    is vetted, and the socket goes to a vetted address. Nothing else resolves the name."""

    def __init__(self, *, allow_private: bool, resolver: Resolver) -> None:
        self._inner = httpcore2.AnyIOBackend()
        self._allow_private = allow_private
        self._resolver = resolver

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        addresses = await vetted_addresses(
            host, port, allow_private=self._allow_private, resolver=self._resolver
        )
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise BlockedAddressError("unix sockets are never called")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What came back: the status, the first ``max_response_bytes`` of the body, whether
    more was left unread, and how long the whole exchange took."""

    status: int
    body: bytes
    truncated: bool
    seconds: float


class GuardedHttp:
    """An HTTP client for URLs users chose; see the module docstring.

    ``timeout`` bounds the whole exchange (resolve, connect, TLS, send, answer).
    Connections are kept alive per origin and stay pinned to the address vetted when
    they were opened."""

    def __init__(
        self,
        *,
        allow_private: bool,
        timeout: float,
        max_response_bytes: int,
        resolver: Resolver = system_resolver,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 100,
    ) -> None:
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=ssl_context or ssl.create_default_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=_PinnedBackend(allow_private=allow_private, resolver=resolver),
        )

    async def post(
        self, url: str, *, headers: Sequence[tuple[str, str]], body: bytes
    ) -> HttpAnswer:
        """POST ``body`` to ``url``. Raises :class:`BlockedAddressError` when the guard
        refuses the address (nothing was sent) and :class:`OutboundHttpError` when the
        exchange failed; any HTTP status, 3xx included, is an answer."""
        began = time.perf_counter()
        limits = {"connect": self.timeout, "read": self.timeout, "write": self.timeout}
        limits["pool"] = self.timeout
        request_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        request_headers.append((b"Content-Length", str(len(body)).encode()))
        try:
            async with asyncio.timeout(self.timeout):
                async with self._pool.stream(
                    b"POST",
                    url.encode("utf-8"),
                    headers=request_headers,
                    content=body,
                    extensions={"timeout": limits},
                ) as response:
                    received = bytearray()
                    truncated = False
                    async for chunk in response.aiter_stream():
                        room = self.max_response_bytes - len(received)
                        if len(chunk) > room:
                            received.extend(chunk[: max(room, 0)])
                            truncated = True
                            break
                        received.extend(chunk)
                    status = response.status
        except BlockedAddressError:
            raise
        except TimeoutError:
            raise OutboundHttpError(f"no answer within {self.timeout:g} s") from None
        except httpcore2.TimeoutException as exc:
            raise OutboundHttpError(f"timed out ({type(exc).__name__})") from None
        except (httpcore2.ConnectError, OSError) as exc:
            raise OutboundHttpError(f"could not connect ({_short(exc)})") from None
        except httpcore2.ProtocolError as exc:
            raise OutboundHttpError(f"broken answer ({_short(exc)})") from None
        except httpcore2.NetworkError as exc:
            raise OutboundHttpError(f"network error ({_short(exc)})") from None
        except httpcore2.UnsupportedProtocol as exc:
            raise OutboundHttpError(f"unsupported URL ({_short(exc)})") from None
        return HttpAnswer(
            status=status,
            body=bytes(received),
            truncated=truncated,
            seconds=time.perf_counter() - began,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
