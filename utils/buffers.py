"""Reusable scratch buffers for the record layer's hot path.

Sealing or opening a 100 KB record needs a few 130 KB temporaries. Allocated fresh each
time, they cost more than the cryptography: the allocator hands such blocks back to the
system on free and every page faults in again on the next record (measured: the server's
kernel time per byte halved without them). A few buffers are kept and lent out instead;
a burst that needs more allocates them and keeps at most ``keep`` afterwards.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class BufferPool:
    """Lends bytearrays of one size; each is used by one thread at a time."""

    def __init__(self, size: int, keep: int = 4) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[memoryview]:
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = bytearray(self.size)
        try:
            yield memoryview(buffer)
        finally:
            with self._lock:
                if len(self._free) < self._keep:
                    self._free.append(buffer)
