"""Blocking-socket helpers: one deadline for a phase, recv sizes that adapt."""

from __future__ import annotations

import socket
import time


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
