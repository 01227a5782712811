"""The webhook destination guard (api/egress.py): literal addresses and local names refused without resolving;
resolved names refused when any address is not public."""

from __future__ import annotations

import socket

import pytest

from api.egress import BlockedDestination, check_url, resolve_checked

BLOCKED = [
    "http://127.0.0.1:8000/hook", "http://10.1.2.3/", "http://172.16.0.9/", "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/", "http://0.0.0.0/", "http://[::1]/",
    "http://[fe80::1]/", "http://[fd00::5]/", "http://[::ffff:127.0.0.1]/", "http://224.0.0.1/",
    "http://localhost/", "http://LOCALHOST./", "http://api.localhost/", "http://redis:6379/", "http://postgres/",
    "http://metadata.google.internal/", "http://printer.local/",
]
ALLOWED = ["https://hooks.example.com/nwc", "http://93.184.216.34/x", "https://[2606:4700::1111]/", "http://8.8.8.8:80/"]


@pytest.mark.parametrize("url", BLOCKED)
def test_non_public_destinations_are_refused(url: str) -> None:
    with pytest.raises(BlockedDestination):
        check_url(url)


@pytest.mark.parametrize("url", ALLOWED)
def test_public_destinations_pass(url: str) -> None:
    check_url(url)


def _fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    def getaddrinfo(host: str, port: int, *a: object, **kw: object) -> list[tuple]:
        if host not in answers:
            raise socket.gaierror(f"unknown host {host}")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_name_is_judged_by_every_address_it_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_resolver(monkeypatch, {"hooks.example.com": ["93.184.216.34", "2606:2800::1"],
                                 "rebind.example.com": ["93.184.216.34", "10.0.0.7"],
                                 "meta.example.com": ["169.254.169.254"]})
    assert resolve_checked("https://hooks.example.com/x") == ["2606:2800::1", "93.184.216.34"]
    for host in ("rebind.example.com", "meta.example.com"):
        with pytest.raises(BlockedDestination, match="non-public"):
            resolve_checked(f"https://{host}/x")
    with pytest.raises(OSError):
        resolve_checked("https://nowhere.example.com/")
