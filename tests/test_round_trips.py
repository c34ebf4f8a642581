"""Round trips of one new connection on the local <-> server link, counted without a clock.

Issue 8, item 5: a change that adds a round trip must fail CI. bench/wan.py measures the
same thing in milliseconds over a delayed link; this test counts it, so it cannot flake.

A relay (bench.delayrelay.DelayRelay with no delay) sits between the real local.py and
server.py and records, in the order it receives them, the chunks of bytes going up (local
-> server) and down. Counted for one new SOCKS5 connection (CONNECT to "localhost", the
reply, an HTTP GET, the first response byte):

- turns: up bytes followed by down bytes, one request/response round trip of the
  application on the link. A new link counts as up (the client spoke first: its SYN), so a
  server that greets first (a banner, a ServerHello) costs a turn, as on a real path where
  its greeting cannot leave before the client's final ACK. The relay receives both
  directions in their causal order (the server cannot answer what it has not received),
  so the count does not depend on timing.
- new links: TCP connections the local opens to the server meanwhile. A userspace relay
  does not see a TCP handshake (the kernel completes it before accept), but each new link
  costs one more round trip (SYN -> SYN-ACK) before the local can send its first byte.

So round trips to the first response byte on a real link = turns + new links (plain TCP:
1 turn + 1 new link = 2; bench/wan.py measures the same figures in milliseconds). The SOCKS
client <-> local side is not counted: it is loopback in every deployment, and its turns
(greeting, request, GET) are fixed by the client, not by sockproxy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench.delayrelay import CLOSE, DOWN, OPEN, UP, DelayRelay, LinkEvent
from tests.conftest import Launcher, TCPServer, socks_request
from utils.socks5 import Reply

# The redesign of issue 8 (protocol version 2), round trips on a real link = turns + new links:
# - warm, honest mode (a session is up): OPEN -> REPLY, GET -> response: 2 turns, no new
#   link = 2 round trips, as ssh -D. (Before the redesign: 3 turns + 1 new link = 4.)
# - warm, fast open: OPEN + GET -> REPLY + response: 1 turn = 1 round trip.
# - cold (a fresh local.py): a new link, ClientInit + OPEN -> ServerResponse + REPLY,
#   GET -> response: 2 turns + 1 new link = 3 round trips. (Before: 4 turns + 1 = 5.)
EXPECTED = {
    "honest": {"warm": (2, 0), "cold": (2, 1)},
    "fast_open": {"warm": (1, 0), "cold": (1, 1)},
}

QUIET = 0.3  # seconds without link traffic before a count starts (settling, not measuring)
SETTLE_TIMEOUT = 10.0
TIMEOUT = 10.0
BODY = b"round trips\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


class LinkLog:
    """Every event the relay saw, in its order; counts from a mark on."""

    def __init__(self) -> None:
        self._events: list[tuple[float, LinkEvent]] = []
        self._lock = threading.Lock()
        self._mark = 0

    def __call__(self, event: LinkEvent) -> None:
        with self._lock:
            self._events.append((time.monotonic(), event))

    def mark(self) -> None:
        with self._lock:
            self._mark = len(self._events)

    def since_mark(self) -> list[LinkEvent]:
        with self._lock:
            return [event for _, event in self._events[self._mark :]]

    def wait_quiet(self) -> None:
        """Until no event for QUIET seconds: the previous connection's ending is over."""
        end = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < end:
            with self._lock:
                last = self._events[-1][0] if self._events else 0.0
            if time.monotonic() - last >= QUIET:
                return
            time.sleep(QUIET / 3)
        pytest.fail(f"the link never went quiet: {self.since_mark()[-10:]}")


@dataclass(frozen=True)
class Count:
    turns: int
    new_links: int
    events: list[LinkEvent]

    @property
    def round_trips(self) -> int:
        return self.turns + self.new_links

    def explain(self) -> str:
        lines = [f"{e.link}:{e.kind}:{e.size}" for e in self.events]
        return f"turns {self.turns}, new links {self.new_links}; events: {' '.join(lines)}"


def count(events: list[LinkEvent]) -> Count:
    """Turns (up bytes, then down bytes) over all links, and the links opened."""
    turns, last = 0, None
    for event in events:
        if event.kind == OPEN or (event.kind in (UP, DOWN) and event.size > 0):
            kind = UP if event.kind == OPEN else event.kind  # a new link: the client spoke
            if kind == DOWN and last == UP:
                turns += 1
            last = kind
    opened = sum(1 for event in events if event.kind == OPEN)
    return Count(turns, opened, events)


def test_count_rules() -> None:
    """The counter itself: EOFs and closes are not turns, consecutive chunks are one, a new
    link is the client's word."""

    def ev(kind: str, size: int = 1) -> LinkEvent:
        return LinkEvent(0, kind, size)  # type: ignore[arg-type]

    events = [ev(OPEN, 0), ev(UP), ev(UP), ev(DOWN), ev(UP), ev(DOWN), ev(DOWN), ev(UP, 0)]
    assert (count(events).turns, count(events).new_links) == (2, 1)
    assert count([ev(DOWN), ev(UP), ev(UP, 0), ev(DOWN, 0), ev(CLOSE, 0)]).turns == 0
    assert count([ev(OPEN, 0), ev(DOWN), ev(UP), ev(DOWN)]).round_trips == 3


# --------------------------------------------------------------------------- the real programs


def _answer_one_get(conn: socket.socket, _peer: Any) -> None:
    """Read one request head, answer it, then hold the connection until the client closes:
    nothing flows on the link after the response but the connection's ending."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            return
        head += data
    conn.sendall(RESPONSE)
    while conn.recv(4096):
        pass


@pytest.fixture
def destination() -> Iterator[TCPServer]:
    server = TCPServer(_answer_one_get)
    yield server
    server.close()


@dataclass
class CountedLink:
    launcher: Launcher
    relay: DelayRelay
    log: LinkLog
    server_port: int


@pytest.fixture
def path(launcher: Launcher) -> Iterator[CountedLink]:
    """server.py, and the counting relay in front of it (no local yet)."""
    server = launcher.server()
    log = LinkLog()
    relay = DelayRelay(("127.0.0.1", server.port), 0.0, observer=log).start()
    try:
        yield CountedLink(launcher, relay, log, server.port)
    finally:
        relay.close()


def new_connection(local_port: int, dest_port: int, log: LinkLog) -> Count:
    """One new SOCKS5 connection and a GET; the count up to the first response byte."""
    result = socks_request(local_port, "localhost", dest_port, timeout=TIMEOUT)
    with result.sock as sock:
        assert result.reply == Reply.SUCCEEDED, result.reply
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = result.rest or sock.recv(1)
        counted = count(log.since_mark())  # the first byte is here: so is its link traffic
        assert first[:1] == RESPONSE[:1]
        rest = first
        while len(rest) < len(RESPONSE):
            data = sock.recv(4096)
            assert data, f"response cut short: {rest!r}"
            rest += data
        assert rest == RESPONSE
    return counted


@pytest.mark.parametrize("mode", ["honest", "fast_open"])
def test_round_trips_of_a_new_connection(
    path: CountedLink, destination: TCPServer, mode: str
) -> None:
    path.log.mark()  # cold: from the local's start, whatever it does on the link
    local = path.launcher.local(path.relay.port, fast_open=mode == "fast_open")
    cold = new_connection(local.port, destination.port, path.log)
    path.log.wait_quiet()
    path.log.mark()
    warm = new_connection(local.port, destination.port, path.log)

    assert warm.turns >= 1, f"the relay saw no traffic: {warm.explain()}"
    expected = EXPECTED[mode]
    assert (warm.turns, warm.new_links) == expected["warm"], f"warm: {warm.explain()}"
    assert (cold.turns, cold.new_links) == expected["cold"], f"cold: {cold.explain()}"
