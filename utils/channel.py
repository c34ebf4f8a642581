"""Socket helpers: one deadline for a phase, recv sizes that adapt, and I/O on
non-blocking sockets with our own waits.

A socket with a timeout makes Python poll() before every recv() and send(): two system
calls, and two chances for another thread to take the GIL, per call. The sessions and the
relays, which make most of the calls, keep their sockets non-blocking instead: each call
is tried at once, and waits (with a timeout) only when the socket is not ready.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from utils.platform_support import Stop, wait_readable, wait_writable


class ReadSize:
    """How much to ask recv() for: grows while reads fill it, shrinks when they do not.

    recv() allocates its whole buffer before it blocks, so a thousand idle connections
    waiting with large buffers would pin a lot of memory; bulk transfers still get large
    reads (and so large records) after a few round trips.
    """

    def __init__(self, high: int, low: int = 16 * 1024) -> None:
        self.low = min(low, high)
        self.high = high
        self.size = self.low

    def update(self, received: int) -> None:
        if received >= self.size:
            self.size = min(self.size * 2, self.high)
        elif received < self.size // 4:
            self.size = max(self.size // 2, self.low)


class Deadline:
    """A point in time that every blocking call of one phase must finish by."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def arm(self, sock: socket.socket) -> None:
        sock.settimeout(self.remaining())


def recv_some(sock: socket.socket, deadline: Deadline, size: int = 4096, flags: int = 0) -> bytes:
    """One recv bounded by ``deadline``; EOF is an error in a phase that needs more bytes."""
    deadline.arm(sock)
    data = sock.recv(size, flags)
    if not data:
        raise ConnectionError("peer closed the connection")
    return data


def receive_into(sock: socket.socket, buffer: bytearray | memoryview, timeout: float) -> int:
    """recv_into on a non-blocking socket: at once if bytes wait, else when they come
    (TimeoutError after ``timeout`` seconds without any)."""
    deadline: float | None = None
    while True:
        try:
            return sock.recv_into(buffer)
        except BlockingIOError:
            pass
        now = time.monotonic()
        deadline = deadline or now + timeout
        if now >= deadline or not wait_readable(sock, deadline - now):
            raise TimeoutError("nothing received in time")


def receive(sock: socket.socket, size: int, timeout: float, stop: Stop = None) -> bytes | None:
    """recv on a non-blocking socket: what has come, b"" at EOF; None when nothing came
    within ``timeout`` (or ``stop`` was set)."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        pass
    if not wait_readable(sock, timeout, stop):
        return None
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None  # readable a moment ago, but nothing to take (a spurious wake-up)


def send_now(sock: socket.socket, data: bytes | memoryview) -> int:
    """What a non-blocking socket takes of ``data`` at once (never waits)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def send_all(
    sock: socket.socket,
    data: bytes | memoryview,
    timeout: float,
    stop: Stop = None,
    progress: Callable[[], object] | None = None,
) -> None:
    """sendall for a non-blocking socket: TimeoutError when it takes no byte for
    ``timeout`` seconds (or once ``stop`` is set); ``progress`` is called after each part
    the socket took (a slow reader that keeps reading is not idle)."""
    view = memoryview(data)
    while view:
        sent = send_now(sock, view)
        if sent:
            view = view[sent:]
            if progress is not None and view:
                progress()
        elif not wait_writable(sock, timeout, stop):
            raise TimeoutError("the peer took no byte in time")
