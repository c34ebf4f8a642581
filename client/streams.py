"""The few things the local's fronts do to a tunnel stream beyond send/receive/send_end.

A stream is what ``Connector.open`` returns (today a ``utils.channel.Channel``). Closing it,
bounding its reads and waking a blocked reader live here, in one place, so that a change of
the stream type changes only this module.
"""

from __future__ import annotations

import socket

from utils.base import quietly_shutdown
from utils.channel import Channel

Stream = Channel


def close_stream(stream: Stream) -> None:
    """Close the stream's connection (without an end-of-stream record)."""
    stream.sock.close()


def set_stream_timeout(stream: Stream, seconds: float) -> None:
    """Every later read or write on the stream waits at most ``seconds``."""
    stream.sock.settimeout(seconds)


def interrupt_stream(stream: Stream) -> None:
    """Wake a thread blocked on the stream (from another thread); the stream is then dead."""
    quietly_shutdown(stream.sock, socket.SHUT_RDWR)
