"""The few things the local's fronts do to a tunnel stream beyond send/receive/send_end.

A stream is what ``Connector.open`` returns (a ``utils.session.Stream``). Reading with the
window kept open, closing it, bounding its waits and waking a blocked reader live here, in
one place, so that a change of the stream type changes only this module.
"""

from __future__ import annotations

from utils.session import Stream

__all__ = ["Stream", "close_stream", "interrupt_stream", "receive", "set_stream_timeout"]


def receive(stream: Stream) -> list[bytes]:
    """What has arrived ([] at the peer's clean end); the window reopens at once, so what
    the caller holds is bounded by one window more."""
    chunks = stream.receive()
    stream.consumed(sum(len(chunk) for chunk in chunks))
    return chunks


def close_stream(stream: Stream) -> None:
    """Done with the stream: a RESET if it has not ended cleanly both ways, then forget it."""
    stream.abort("closed by the HTTP front")
    stream.close()


def set_stream_timeout(stream: Stream, seconds: float) -> None:
    """Every later wait on the stream lasts at most ``seconds``."""
    stream.timeout = seconds


def interrupt_stream(stream: Stream) -> None:
    """Wake a thread blocked on the stream (from another thread); the stream is then dead."""
    stream.abort("interrupted")
