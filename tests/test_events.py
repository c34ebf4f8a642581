"""Tests of utils/events.py: socket errors as the events the logs name."""

from __future__ import annotations

import errno

import pytest

from utils.errors import ChannelError
from utils.events import ClientGone, client_event, describe, event, greeting_phase


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (TimeoutError("timed out"), "timeout"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "reset by the peer"),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "peer closed while we were sending"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (ConnectionError("peer closed the connection"), "peer closed the connection"),
        (ConnectionError(), "peer closed the connection"),
        (OSError(errno.EMFILE, "Too many open files"), None),
        (ChannelError("record failed"), None),
    ],
)
def test_event(exc: BaseException, text: str | None) -> None:
    assert event(exc) == text


def test_describe_prefers_events_then_falls_back() -> None:
    assert describe(ConnectionError("peer closed the connection")) == "peer closed the connection"
    assert describe(OSError(errno.EMFILE, "Too many open files")) == "too many open files"
    assert describe(ChannelError("record failed")) == "record failed"
    assert describe(ValueError("x")) == "ValueError"


@pytest.mark.parametrize(
    ("exc", "started", "text"),
    [
        (ConnectionError("peer closed the connection"), False, "client closed before the greeting"),
        (ConnectionError("peer closed the connection"), True, "client closed during the greeting"),
        (ConnectionResetError(errno.ECONNRESET, "x"), False, "client reset before the greeting"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True, "client reset during the greeting"),
        (TimeoutError(), False, "client sent nothing (handshake_timeout)"),
        (TimeoutError(), True, "client too slow to finish the greeting (handshake_timeout)"),
        (OSError(errno.EBADF, "Bad file descriptor"), True,
         "client connection failed during the greeting: bad file descriptor"),
    ],
)  # fmt: skip
def test_client_event(exc: OSError, started: bool, text: str) -> None:
    assert str(client_event(exc, started)) == text


def test_greeting_phase_converts_only_socket_errors() -> None:
    with pytest.raises(ClientGone, match="client reset before the greeting"), greeting_phase(False):
        raise ConnectionResetError(errno.ECONNRESET, "reset")
    with pytest.raises(ChannelError), greeting_phase(True):
        raise ChannelError("not a socket error")
