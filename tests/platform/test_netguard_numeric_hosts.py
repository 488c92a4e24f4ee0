"""The SSRF guard reads a host the way the system resolver does: the legacy numeric
spellings of an IPv4 address that ``inet_aton`` accepts (one number, fewer than four
parts, hexadecimal, octal) and IPv6 literals are addresses, judged like any other, so
a webhook URL naming loopback that way is refused when it is registered."""

from __future__ import annotations

import pytest

from soko.platform.netguard import UnsafeUrlError, check_url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://2130706433/", "loopback"),  # 127.0.0.1 as one number
        ("https://127.1/", "loopback"),  # 127.0.0.1 in two parts
        ("http://0x7f000001:9999/", "loopback"),  # hexadecimal
        ("https://0X7F.1/hook", "loopback"),
        ("https://0177.0.0.1/", "loopback"),  # octal
        ("https://0/", "unspecified"),  # 0.0.0.0
        ("https://0x0/", "unspecified"),
        ("https://167772161/", "private"),  # 10.0.0.1
        ("https://0xa9fea9fe/latest/meta-data", "metadata"),  # 169.254.169.254
        ("https://0251.0376.0251.0376/", "metadata"),  # the same, in octal
        ("https://169.16689662/", "metadata"),  # the same, in two parts
        ("https://192.168.257/", "private"),  # 192.168.1.1 in three parts
        ("https://2130706433./", "loopback"),  # a trailing dot changes nothing
        ("https://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "loopback"),  # full-width digits
        ("https://127\u30021/", "loopback"),  # an ideographic full stop
        ("https://[::ffff:127.0.0.1]/", "IPv6 form of a loopback"),
        ("https://[::ffff:7f00:1]/", "IPv6 form of a loopback"),
        ("https://[::ffff:a9fe:a9fe]/", "IPv6 form of a cloud metadata"),
        ("https://[::1]:8443/", "loopback"),
        ("https://[fe80::1%25eth0]/", "scoped"),
    ],
)
def test_numeric_spellings_of_refused_addresses_are_refused(url: str, why: str) -> None:
    with pytest.raises(UnsafeUrlError, match=why):
        check_url(url, allow_http=True, allow_private=False)


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://134744072/hook", "134744072"),  # 8.8.8.8: public, so allowed
        ("https://0x08080808/", "0x08080808"),
        ("https://1.2.3.4.5/", "1.2.3.4.5"),  # five parts: a name, not an address
        ("https://08.0.0.1/", "08.0.0.1"),  # "08" is not octal: a name
        ("https://4294967296/", "4294967296"),  # past 32 bits: a name
        ("https://deadbeef/", "deadbeef"),  # hexadecimal only with 0x: a name
        ("https://0x7f.example/", "0x7f.example"),
    ],
)
def test_hosts_that_only_look_numeric_are_names_or_public(url: str, host: str) -> None:
    assert check_url(url, allow_http=False, allow_private=False).host == host


def test_numeric_spellings_pass_when_private_addresses_are_allowed() -> None:
    target = check_url("http://0x7f000001:9999/h", allow_http=True, allow_private=True)
    assert (target.host, target.port) == ("0x7f000001", 9999)
