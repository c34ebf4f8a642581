"""What differs between Linux, macOS and Windows, each guarded by the feature's presence.

Every branch asks whether the standard library has the feature (``hasattr(os, "fchmod")``,
``getattr(signal, "SIGHUP", None)``, ``hasattr(socket, "SO_EXCLUSIVEADDRUSE")``), never which
platform it runs on, so tests can exercise each branch by deleting the attribute.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "FDS_PER_CONNECTION",
    "FD_RESERVE",
    "O_BINARY",
    "O_NONBLOCK",
    "connections_for_fd_limit",
    "effective_uid",
    "exclusive_bind_option",
    "has_posix_permissions",
    "open_file_limit",
    "optional_signal",
    "raise_open_file_limit",
    "recv_datagram",
    "set_file_mode",
    "stop_signals",
    "wait_readable",
    "wait_writable",
]

log = logging.getLogger("sockproxy")

#: ``os.O_NONBLOCK`` where it exists (POSIX); 0 on Windows, where a FIFO cannot sit at a path.
O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)

#: ``os.O_BINARY`` on Windows (no CRLF or Ctrl-Z translation by the C runtime); 0 elsewhere.
O_BINARY: int = getattr(os, "O_BINARY", 0)

#: File descriptors one client connection can hold in either program: the local has the
#: browser's socket, the channel to the server and (for UDP ASSOCIATE) a UDP socket; the
#: server has the channel, the destination socket or its UDP socket. 3 covers both.
FDS_PER_CONNECTION = 3

#: Descriptors kept for the rest of the program: listening socket, std streams, log files,
#: key and config files, DNS lookups, the interpreter's own.
FD_RESERVE = 32

#: Highest soft limit we ask for when the hard limit is unlimited (macOS refuses
#: RLIM_INFINITY for RLIMIT_NOFILE; its kern.maxfilesperproc default is 10240 or more).
_UNLIMITED_TARGET = 65536
_MACOS_OPEN_MAX = 10240

#: Longest single select() while waiting, so a stop request is seen this fast.
_WAKE_INTERVAL = 0.2


# --- files -----------------------------------------------------------------------------------


def effective_uid() -> int | None:
    """Our user id where owners and mode bits decide who may change a file; None on Windows.

    ``os.geteuid`` is the witness: Windows lacks it, and there ACLs, not mode bits, decide.
    """
    geteuid: Callable[[], int] | None = getattr(os, "geteuid", None)
    return None if geteuid is None else geteuid()


def has_posix_permissions() -> bool:
    """Whether owners and mode bits decide who may change a file (not on Windows: ACLs do)."""
    return effective_uid() is not None


def set_file_mode(fd: int, path: str | os.PathLike[str], mode: int) -> None:
    """``fchmod`` the open file where it exists; else ``chmod`` the path (Windows < 3.13)."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:
        os.chmod(path, mode)


# --- signals ---------------------------------------------------------------------------------


def optional_signal(name: str) -> int | None:
    """The number of signal ``name`` (e.g. ``"SIGHUP"``) or None where the platform lacks it."""
    value = getattr(signal, name, None)
    return int(value) if value is not None else None


def stop_signals() -> tuple[int, ...]:
    """Signals that stop a program: SIGINT (Ctrl-C), SIGTERM, and SIGBREAK (Windows Ctrl-Break)."""
    names = ("SIGINT", "SIGTERM", "SIGBREAK")
    return tuple(n for n in (optional_signal(name) for name in names) if n is not None)


# --- open-file limit -------------------------------------------------------------------------


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE, or None where ``resource`` is absent (Windows: no such limit)."""
    resource = _resource()
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def raise_open_file_limit() -> int | None:
    """Raise the soft open-file limit towards the hard one; return the soft limit in force."""
    resource = _resource()
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    ceiling = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    # macOS refuses more than kern.maxfilesperproc even under a higher hard limit: try less
    for target in (ceiling, min(ceiling, _MACOS_OPEN_MAX)):
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        log.debug("open-file limit raised from %d to %d", soft, target)
        break
    return open_file_limit()


def connections_for_fd_limit(requested: int, limit: int | None) -> int:
    """``requested`` connections, or fewer when ``limit`` open files cannot hold that many."""
    if limit is None:
        return requested
    return max(1, min(requested, (limit - FD_RESERVE) // FDS_PER_CONNECTION))


def _resource() -> Any:
    try:
        import resource  # noqa: PLC0415  (absent on Windows)
    except ImportError:
        return None
    return resource


# --- sockets ---------------------------------------------------------------------------------


def exclusive_bind_option() -> int | None:
    """``SO_EXCLUSIVEADDRUSE`` where it exists (Windows): no other program may bind our port.

    On Windows ``SO_REUSEADDR`` would let another program bind the same address and read the
    browser's traffic; POSIX ``SO_REUSEADDR`` only allows a restart over TIME_WAIT sockets.
    """
    value = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
    return int(value) if value is not None else None


class _Flag(Protocol):
    def is_set(self) -> bool: ...


Stop = _Flag | Callable[[], bool] | None


def wait_readable(sock: socket.socket, timeout: float | None, stop: Stop = None) -> bool:
    """Wait until ``sock`` is readable: True; False on ``timeout`` or once ``stop`` is set.

    ``stop`` is a ``threading.Event`` (or anything with ``is_set()``) or a callable returning
    True to give up. With a ``stop`` the wait is a series of short selects, so a reader wakes
    within ``_WAKE_INTERVAL`` of a stop on every platform (``shutdown()`` from another thread
    does not wake a blocked ``recv`` on Windows). A closed socket counts as readable: the
    read that follows then reports the error.
    """
    return _wait(sock, _POLLIN, timeout, stop)


def wait_writable(sock: socket.socket, timeout: float | None = 0.0, stop: Stop = None) -> bool:
    """Whether ``sock`` takes bytes now (the default: never waits) or within ``timeout``;
    ``stop`` as for ``wait_readable``. A broken socket counts as writable: the send that
    follows reports the error."""
    return _wait(sock, _POLLOUT, timeout, stop)


def _wait(sock: socket.socket, events: int, timeout: float | None, stop: Stop) -> bool:
    stopped = _stop_check(stop)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stopped():
        slice_ = None if stop is None else _WAKE_INTERVAL
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None:
            slice_ = max(0.0, left if slice_ is None else min(slice_, left))
        if sock.fileno() < 0:
            return True
        try:
            if _ready(sock, events, slice_):
                return True
        except (OSError, ValueError):
            return True
        if left is not None and left <= (slice_ or 0.0):
            return False
    return False


_POLLIN = getattr(select, "POLLIN", 1)
_POLLOUT = getattr(select, "POLLOUT", 4)


def _ready(sock: socket.socket, events: int, seconds: float | None) -> bool:
    """One wait for ``events`` (``seconds`` None: no limit): poll() where it exists (no
    FD_SETSIZE limit: a proxy holds thousands of sockets), select() elsewhere (Windows,
    whose select has no such limit)."""
    poll = getattr(select, "poll", None)
    if poll is not None:
        poller = poll()
        poller.register(sock, events)
        return bool(poller.poll(None if seconds is None else seconds * 1000))
    lists: tuple[list[socket.socket], list[socket.socket]] = (
        ([sock], []) if events == _POLLIN else ([], [sock])
    )
    readable, writable, _ = select.select(lists[0], lists[1], [], seconds)
    return bool(readable or writable)


def _stop_check(stop: Stop) -> Callable[[], bool]:
    if stop is None:
        return lambda: False
    if callable(stop):
        return stop
    return stop.is_set


def recv_datagram(sock: socket.socket, size: int) -> tuple[bytes, Any] | None:
    """One ``recvfrom``; None when it timed out or reported an earlier send's ICMP error.

    Windows reports an ICMP port unreachable for an earlier ``sendto`` as
    ``ConnectionResetError`` on the next ``recvfrom`` (Linux may say ``ConnectionRefusedError``
    on a connected socket); for an association with many peers that is no reason to end.
    """
    try:
        return sock.recvfrom(size)
    except (TimeoutError, ConnectionResetError, ConnectionRefusedError):
        return None
