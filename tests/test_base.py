"""Tests of utils/base.py's ConnectionSockets: every socket of a connection closed once, in
the manner its end calls for, on every path (a clean end, an exception, an abort)."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import Sessions, tcp_pair
from utils.base import AccessRecord, ConnectionSockets, Relay
from utils.session import StreamReset


class CountingSocket(socket.socket):
    """A socket that counts the calls of its close()."""

    closes = 0

    def close(self) -> None:
        self.closes += 1
        super().close()


def counting(sock: socket.socket) -> CountingSocket:
    timeout = sock.gettimeout()
    counted = CountingSocket(fileno=sock.detach())
    counted.settimeout(timeout)
    return counted


class Connection:
    """What one connection opens: a TCP side (with its peer), a UDP socket, a stream (with
    the far end of the stream), all registered with ``sockets``."""

    def __init__(self, sessions: Sessions) -> None:
        near, self.peer = tcp_pair()
        self.plain = counting(near)
        self.udp = counting(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.stream, self.far_stream = sessions.stream_pair()
        self.session = sessions.near
        self.record = AccessRecord("127.0.0.1:1")
        self.sockets = ConnectionSockets(self.record)
        self.sockets.plain(self.plain)
        self.sockets.udp(self.udp)
        self.sockets.stream(self.stream)

    def assert_all_closed_once(self) -> None:
        assert (self.plain.closes, self.udp.closes) == (1, 1)
        assert self.plain.fileno() == self.udp.fileno() == -1
        assert self.session.stream_count == 0  # the session forgot the stream
        self.sockets.close()  # a second close finds nothing left
        assert (self.plain.closes, self.udp.closes) == (1, 1)

    def peer_sees(self) -> str:
        """How the plain side's peer saw the end: "eof" or "reset"."""
        try:
            data = self.peer.recv(100)
        except ConnectionResetError:
            return "reset"
        finally:
            self.peer.close()
        assert data == b""
        return "eof"

    def far_stream_was_reset(self) -> bool:
        try:
            self.far_stream.receive(0.5)
        except StreamReset:
            return True
        except TimeoutError:
            return False
        raise AssertionError("the far end of the stream got an end of stream")


def test_a_clean_end_closes_everything_once_with_a_fin(sessions: Sessions) -> None:
    connection = Connection(sessions)
    with connection.sockets:
        pass
    connection.assert_all_closed_once()
    assert connection.peer_sees() == "eof"
    assert not connection.far_stream_was_reset()
    assert connection.record.outcome == "ok"


def test_an_exception_closes_everything_once_and_resets_the_stream(sessions: Sessions) -> None:
    connection = Connection(sessions)
    with pytest.raises(ConnectionError), connection.sockets:
        raise ConnectionError("client gone before the reply")
    connection.assert_all_closed_once()
    assert connection.peer_sees() == "eof"  # a refusal is answered, then closed cleanly
    assert connection.far_stream_was_reset()  # the peer lets go of its end of the stream
    assert connection.record.outcome == "ok"  # the handler names the exception


def test_an_aborted_tunnel_resets_the_plain_side_and_says_so(sessions: Sessions) -> None:
    connection = Connection(sessions)
    with connection.sockets:
        relay = Relay(connection.plain, connection.stream, idle_timeout=5.0)
        connection.record.relay = relay
        relay.abort("shutting down")
    connection.assert_all_closed_once()
    assert connection.peer_sees() == "reset"
    assert connection.far_stream_was_reset()
    assert connection.record.outcome == "aborted: shutting down"
