"""utils/ratelimit.py: strangers cannot pace our logs (issue 12, item 5)."""

from __future__ import annotations

import logging
import socket

import pytest

from tests.conftest import Launcher, TCPServer, access_lines, socks_request, wait_for
from utils.ratelimit import MAX_SOURCES, LimitedLog, TokenBuckets, source_of


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate_per_source() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=3.0, clock=clock)
    assert [buckets.admit("a") for _ in range(5)] == [True, True, True, False, False]
    assert buckets.admit("b")  # another source has its own bucket
    clock.now += 1.0
    assert buckets.admit("a") and not buckets.admit("a")
    clock.now += 100.0
    assert sum(buckets.admit("a") for _ in range(10)) == 3  # refills to the burst, no more


def test_summaries_once_per_interval_with_the_counts() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=1.0, summary_interval=60.0, clock=clock)
    for _ in range(11):
        buckets.admit("192.0.2.1")
    buckets.admit("192.0.2.2")
    assert buckets.due_summaries() == []  # not yet
    clock.now += 60
    assert buckets.due_summaries() == [("192.0.2.1", 10)]
    clock.now += 60
    assert buckets.due_summaries() == []  # counted once


def test_many_sources_keep_bounded_memory() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock=clock)
    for i in range(MAX_SOURCES * 3):
        buckets.admit(f"10.0.{i >> 8}.{i & 255}")
    assert len(buckets._buckets) <= MAX_SOURCES


def test_a_source_is_an_ipv4_address_or_an_ipv6_slash_64() -> None:
    assert source_of("192.0.2.1") == "192.0.2.1"
    assert source_of("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert source_of("fe80::1%eth0") == "fe80::/64"


def test_limited_log_writes_summaries(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = LimitedLog(logging.getLogger("t"), TokenBuckets(1.0, 2.0, 10.0, clock))
    with caplog.at_level(logging.WARNING, logger="t"):
        written = [limited.warning("198.51.100.1", "refused %s", n) for n in range(50)]
        clock.now += 10
        limited.flush()
    assert written.count(True) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0",
        "refused 1",
        "suppressed 48 similar line(s) from 198.51.100.1",
    ]


# --------------------------------------------------------------------------- the real programs


def _hit(port: int, count: int, wait: bool = True) -> None:
    """Connect and close ``count`` times (``wait``: for the server's close first)."""
    for _ in range(count):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.settimeout(5)
                if wait:
                    sock.recv(1)
        except OSError:
            pass


def test_2000_refused_connections_write_a_bounded_log(launcher: Launcher) -> None:
    server = launcher.server(whitelist=["10.0.0.0/8"])
    before = len(server.stderr().splitlines())
    _hit(server.port, 2000)
    assert wait_for(lambda: "not on the whitelist" in server.stderr(), 5)
    lines = server.stderr().splitlines()[before:]
    refused = [line for line in lines if "not on the whitelist" in line]
    print(f"2000 refused connections: {len(refused)} refusal lines, {len(lines)} lines in all")
    assert 1 <= len(refused) <= 20, f"{len(refused)} refusal lines for 2000 connections"
    assert len(lines) <= 30, "\n".join(lines[:40])


def test_failed_handshakes_are_limited_but_real_users_are_always_logged(
    launcher: Launcher, echo_server: TCPServer
) -> None:
    server, local = launcher.pair()
    _hit(server.port, 300, wait=False)  # connect and close: a failed handshake each
    assert wait_for(lambda: "handshake from" in server.stderr(), 5)
    for _ in range(5):
        result = socks_request(local.port, "127.0.0.1", echo_server.port)
        assert result.reply.name == "SUCCEEDED"
        result.sock.close()
    assert wait_for(lambda: len(_named(server.stderr())) == 5, 10), server.stderr()[-3000:]
    text = server.stderr()
    failures = text.count("handshake from")
    print(f"300 failed handshakes: {failures} lines, {len(access_lines(text))} access lines")
    assert 1 <= failures <= 20, f"{failures} handshake-failure lines for 300 connections"
    assert len(_named(text)) == 5  # the access lines of real users are never dropped


def _named(text: str) -> list[str]:
    return [line for line in access_lines(text) if "(local_public" in line]
