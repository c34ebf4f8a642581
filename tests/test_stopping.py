"""Tests of utils/stopping.py: the relay and a UDP association stop and idle out alike.

Each runs on a real stream between two in-process sessions, with real sockets; a test
measures how long the tunnel took to end, what it reported, and what the far end of the
stream saw (a RESET after an abort, an end of stream after a clean end).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from client.udp import LocalAssociation
from tests.conftest import Sessions, tcp_pair
from utils.base import Relay
from utils.mux import INITIAL_WINDOW
from utils.session import Stream, StreamReset
from utils.stopping import IDLE_TIMEOUT, POLL_INTERVAL, Tunnel

SLACK = 1.0  # a loaded two-core machine may run a woken thread this late
KINDS = ["relay", "association"]


class Running:
    """A relay (over a TCP pair) or a local UDP association (a TCP control connection and
    a UDP socket), serving in a thread on one end of a stream."""

    def __init__(self, kind: str, sessions: Sessions, idle_timeout: float) -> None:
        stream, self.far = sessions.stream_pair()
        near, self.peer = tcp_pair()
        self.near = near  # the tunnel's plain side (the peer is its client)
        self._sockets = [near, self.peer]
        self.tunnel: Relay | LocalAssociation
        if kind == "relay":
            self.tunnel = Relay(near, stream, idle_timeout)
        else:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            self._sockets.append(udp)
            self.tunnel = LocalAssociation(
                near, udp, stream, client=("127.0.0.1", 0), idle_timeout=idle_timeout
            )
        self.result: str | None = "still running"
        self.started = time.monotonic()
        self.ended = 0.0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.result = self.tunnel.serve()
        self.ended = time.monotonic()

    def join(self, timeout: float) -> float:
        """Seconds from ``self.started`` to the end of serve()."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the tunnel did not end"
        return self.ended - self.started

    def far_sees(self) -> str:
        """What the far end of the stream got: "reset" or "end" (an end of stream)."""
        try:
            while self.far.receive(5.0):
                pass
        except StreamReset:
            return "reset"
        return "end"

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def running(sessions: Sessions) -> Iterator[Callable[[str, float], Running]]:
    started: list[Running] = []

    def start(kind: str, idle_timeout: float) -> Running:
        started.append(Running(kind, sessions, idle_timeout))
        return started[-1]

    yield start
    for each in started:
        each.close()


@pytest.mark.parametrize("kind", KINDS)
def test_relay_and_association_idle_out_alike(
    running: Callable[[str, float], Running], kind: str
) -> None:
    idle = 0.6
    tunnel = running(kind, idle)
    took = tunnel.join(idle + POLL_INTERVAL + SLACK + 5)
    assert tunnel.result == IDLE_TIMEOUT
    assert idle <= took <= idle + POLL_INTERVAL + SLACK
    assert tunnel.far_sees() == "reset"


@pytest.mark.parametrize("kind", KINDS)
def test_an_abort_stops_either_within_the_poll_interval_and_the_first_reason_wins(
    running: Callable[[str, float], Running], kind: str
) -> None:
    tunnel = running(kind, 30.0)
    time.sleep(0.3)  # every worker is blocked in its read by now
    aborted = time.monotonic()
    tunnel.tunnel.abort("shutting down")
    tunnel.tunnel.abort("a later reason")
    tunnel.join(POLL_INTERVAL + SLACK + 5)
    assert tunnel.ended - aborted <= POLL_INTERVAL + SLACK
    assert tunnel.result == tunnel.tunnel.failure == "shutting down"
    assert tunnel.far_sees() == "reset"  # no end of stream after an abort


@pytest.mark.parametrize("kind", KINDS)
def test_a_clean_end_returns_none_and_ends_the_stream(
    running: Callable[[str, float], Running], kind: str
) -> None:
    tunnel = running(kind, 30.0)
    if kind == "relay":  # both directions end
        tunnel.peer.shutdown(socket.SHUT_WR)
        tunnel.far.send_end()
    else:  # the client closes its control connection
        tunnel.peer.close()
    tunnel.join(POLL_INTERVAL + SLACK + 5)
    assert tunnel.result is None
    assert tunnel.far_sees() == "end"


def test_a_slow_client_that_keeps_reading_is_not_idle(
    running: Callable[[str, float], Running],
) -> None:
    """Bytes trickling out to a slow client are traffic: a relay that takes longer than
    idle_timeout to hand one batch on (a stream's window of bytes) is not cut as idle."""
    idle = 1.5
    tunnel = running("relay", idle)
    tunnel.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tunnel.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = os.urandom(INITIAL_WINDOW // 2)  # (the far stream may send its window without a grant)
    threading.Thread(target=tunnel.far.send, args=(data,), daemon=True).start()
    received = bytearray()
    tunnel.peer.settimeout(10)
    rate = len(data) / (2 * idle)  # bytes per second: the whole takes two idle timeouts
    start = time.monotonic()
    while len(received) < len(data):
        try:
            chunk = tunnel.peer.recv(4096)
        except TimeoutError:
            chunk = b""
        assert chunk, f"cut after {len(received)} bytes: {tunnel.tunnel.failure}"
        received += chunk
        time.sleep(max(0.0, start + len(received) / rate - time.monotonic()))
    assert bytes(received) == data  # (once all is handed on, the relay may idle out: fine)


def _quiet_reader(tunnel: Tunnel, stream: Stream) -> Callable[[], None]:
    def read() -> None:
        tunnel.wait(lambda: stream.receive(POLL_INTERVAL))

    return read


def test_an_error_in_one_worker_aborts_the_others(sessions: Sessions) -> None:
    stream, far = sessions.stream_pair()
    tunnel = Tunnel(stream, idle_timeout=30.0)

    def failing() -> None:
        raise ConnectionResetError

    assert tunnel.run(_quiet_reader(tunnel, stream), failing) == "reset by the peer"
    with pytest.raises(StreamReset):
        far.receive(5.0)


def test_a_clean_stop_ends_every_worker_without_a_failure(sessions: Sessions) -> None:
    stream, far = sessions.stream_pair()
    tunnel = Tunnel(stream, idle_timeout=30.0)
    started = time.monotonic()
    assert tunnel.run(_quiet_reader(tunnel, stream), tunnel.stop) is None
    assert time.monotonic() - started <= POLL_INTERVAL + SLACK
    with pytest.raises(TimeoutError):
        far.receive(0.2)  # neither a RESET nor an end of stream: that is the owner's to say


def test_an_unexpected_exception_aborts_the_tunnel_and_propagates(sessions: Sessions) -> None:
    stream, far = sessions.stream_pair()
    tunnel = Tunnel(stream, idle_timeout=30.0)

    def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        tunnel.run(broken)
    assert tunnel.failure == "internal error (ValueError)"
    with pytest.raises(StreamReset):
        far.receive(5.0)
