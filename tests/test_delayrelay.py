"""bench/delayrelay.py: what it passes on (every byte, in order, half-closes, resets) and that
it never delivers early. Upper bounds on time are the benchmark's business (bench/wan.py's
plain-TCP calibration row), not a test's."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.delayrelay import CLOSE, DOWN, OPEN, UP, DelayRelay, LinkEvent
from tests.conftest import TCPServer, free_port, read_to_end, set_reset_on_close, wait_for

TIMEOUT = 10.0


def _echo_then_close(conn: socket.socket, _peer: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.sendall(b"bye")
    conn.shutdown(socket.SHUT_WR)


def _send_and_end(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)


def _reset_at_once(conn: socket.socket, _peer: Any) -> None:
    conn.recv(1)
    set_reset_on_close(conn)


@pytest.fixture
def echo() -> Iterator[TCPServer]:
    server = TCPServer(_echo_then_close)
    yield server
    server.close()


def _client(relay: DelayRelay) -> socket.socket:
    return socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)


def test_every_byte_both_ways_in_order_and_the_half_close(echo: TCPServer) -> None:
    events: list[LinkEvent] = []
    payload = os.urandom(3_000_000)
    with DelayRelay(("127.0.0.1", echo.port), 0.0, observer=events.append) as relay:
        sock = _client(relay)
        sender = threading.Thread(target=_send_and_end, args=(sock, payload))
        sender.start()
        received, ended = read_to_end(sock)
        sender.join(TIMEOUT)
        sock.close()
        assert ended == "eof"
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload + b"bye").digest()
        assert wait_for(lambda: bool(events) and events[-1].kind == CLOSE, TIMEOUT)
    kinds = [e.kind for e in events]
    assert kinds[0] == OPEN
    assert sum(e.size for e in events if e.kind == UP) == len(payload)
    assert sum(e.size for e in events if e.kind == DOWN) == len(payload) + 3
    assert {e.link for e in events} == {0}


def test_a_reset_is_passed_on() -> None:
    server = TCPServer(_reset_at_once)
    try:
        with DelayRelay(("127.0.0.1", server.port), 0.0) as relay, _client(relay) as sock:
            sock.sendall(b"x")
            _, ended = read_to_end(sock)
            assert ended == "reset"
    finally:
        server.close()


def test_a_refused_upstream_resets_the_client() -> None:
    with DelayRelay(("127.0.0.1", free_port()), 0.0) as relay:
        try:
            sock = _client(relay)
        except ConnectionResetError:
            return  # reset even before connect() returned: the fastest reset there is
        with sock:
            try:
                sock.sendall(b"x")
            except (ConnectionResetError, BrokenPipeError):
                return
            _, ended = read_to_end(sock)
        assert ended == "reset"


def test_nothing_arrives_before_its_time(echo: TCPServer) -> None:
    """RTT 2d = 80 ms: the upstream connects after 1.5 RTT; the first echo takes 2 RTT from
    the client's connect, the next one RTT. Lower bounds only: the relay sleeps until due."""
    delay = 0.04
    with DelayRelay(("127.0.0.1", echo.port), delay) as relay:
        started = time.monotonic()
        with _client(relay) as sock:
            sock.sendall(b"a")
            assert sock.recv(1) == b"a"
            first = time.monotonic()
            assert echo.peers, "the upstream saw no connection"
            sock.sendall(b"b")
            assert sock.recv(1) == b"b"
            second = time.monotonic()
    assert first - started >= 4 * delay
    assert second - first >= 2 * delay


def test_close_resets_open_links(echo: TCPServer) -> None:
    relay = DelayRelay(("127.0.0.1", echo.port), 0.0).start()
    with _client(relay) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        relay.close()
        _, ended = read_to_end(sock)
        assert ended in ("reset", "eof")
    with pytest.raises(OSError):
        _client(relay)
