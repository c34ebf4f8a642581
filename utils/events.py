"""What happened to a connection, in words for the logs: events, not errno text.

``describe`` asks ``event`` first; the local's greeting phase turns any socket error into a
``ClientGone`` that says what the client did and when.
"""

from __future__ import annotations

from types import TracebackType

from utils.errors import ProtocolError, SockproxyError


class ClientGone(ProtocolError):
    """The client closed, reset or went silent before its request was complete."""


_EVENTS: tuple[tuple[type[OSError], str], ...] = (
    (TimeoutError, "timeout"),
    (ConnectionResetError, "reset by the peer"),
    (BrokenPipeError, "peer closed while we were sending"),
    (ConnectionAbortedError, "connection aborted"),
    (ConnectionRefusedError, "connection refused"),
)


def event(exc: BaseException) -> str | None:
    """The event a socket error stands for, or None if it is not one we name."""
    for kind, text in _EVENTS:
        if isinstance(exc, kind):
            return text
    if isinstance(exc, ConnectionError) and not exc.strerror:
        return str(exc) or "peer closed the connection"
    return None


def describe(exc: BaseException) -> str:
    """A short, secret-free reason for the logs: an event where we can name one."""
    named = event(exc)
    if named is not None:
        return named
    if isinstance(exc, SockproxyError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def client_event(exc: OSError, started: bool) -> ClientGone:
    """``exc`` met while reading the client's greeting, as the event it was."""
    phase = "during the greeting" if started else "before the greeting"
    if isinstance(exc, TimeoutError):
        what = "client too slow to finish the greeting" if started else "client sent nothing"
        return ClientGone(f"{what} (handshake_timeout)")
    if isinstance(exc, ConnectionResetError):
        return ClientGone(f"client reset {phase}")
    if isinstance(exc, ConnectionError):
        return ClientGone(f"client closed {phase}")
    return ClientGone(f"client connection failed {phase}: {(exc.strerror or str(exc)).lower()}")


class greeting_phase:  # noqa: N801 (used like the function it was)
    """Socket errors inside become ``ClientGone`` events (``started``: bytes have arrived).

    A class, not a generator-based context manager: it runs twice per connection."""

    def __init__(self, started: bool) -> None:
        self._started = started

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, OSError):
            raise client_event(exc, self._started) from None
