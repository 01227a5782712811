"""Where the service may send requests on a user's behalf (webhooks): public addresses only, by default.

A webhook URL is user input that the worker POSTs to from inside the deployment, so without a check it reaches the
metadata service (169.254.169.254), the database or the object store on the private network (SSRF, OWASP API7).
Two checks, the same rule: the API refuses a URL whose host is a literal non-public address or a local name when
the job is created (a clear 422; it does not resolve names, which may not resolve from the API's network), and the
worker resolves the host right before each delivery and refuses if any address is not public (a name can point
anywhere, and can change). `NWC_WEBHOOK_ALLOW_PRIVATE=true` lifts both for deployments whose receivers live on the
internal network (and for the tests, whose receivers listen on loopback).

What remains: the name is resolved again by the HTTP client when it connects, so a receiver that controls its DNS
can still answer differently the second time (DNS rebinding) within the record's TTL.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = ["BlockedDestination", "check_url", "resolve_checked"]

_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain")


class BlockedDestination(ValueError):
    """The URL points at an address the service must not send requests to."""


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _host(url: str) -> str:
    host = urlsplit(url).hostname
    if not host:
        raise BlockedDestination(f"{url!r} has no host")
    return host.rstrip(".").lower()


def check_url(url: str) -> None:
    """Refuse a literal non-public IP or a local name, without resolving anything."""
    host = _host(url)
    if host == "localhost" or host.endswith(_LOCAL_SUFFIXES) or "." not in host and ":" not in host:
        raise BlockedDestination(f"host {host!r} is a local name; webhooks go to public addresses")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return
    if not _is_public(ip):
        raise BlockedDestination(f"address {host} is not public (private, loopback, link-local or reserved)")


def resolve_checked(url: str) -> list[str]:
    """Every address the URL's host resolves to, all public; BlockedDestination if any is not, OSError if the
    name does not resolve."""
    check_url(url)
    host = _host(url)
    port = urlsplit(url).port or (443 if url.lower().startswith("https") else 80)
    addrs = sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
    bad = [a for a in addrs if not _is_public(ipaddress.ip_address(a.split("%", 1)[0]))]
    if bad:
        raise BlockedDestination(f"host {host!r} resolves to non-public address(es) {', '.join(bad)}")
    return addrs
