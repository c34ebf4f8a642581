"""Slowing password guessing on the local: a per-source delay after failed attempts.

After a source's n-th failed RFC 1929 / HTTP Basic attempt, its next check waits
``first * 2**(n-1)`` seconds (0.1 s doubling, at most ``cap`` = 5 s). Attempts in parallel
queue behind each other (each reserves the next slot), so more connections do not buy more
guesses. A correct password resets the source; a source quiet for ``forget_after`` seconds
is forgotten. Other sources are never slowed. ``PasswordBackoff`` is the bookkeeping (an
injectable clock, a lock because handler threads share it); ``check_after_backoff`` waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_SOURCES = 10_000  # sources remembered at once; past it the longest-quiet go first


@dataclass
class _Failures:
    count: int
    last_failure: float
    next_check: float  # when the next attempt of this source may be checked


class PasswordBackoff:
    """Per-source failure counts and the slot each source's next check may run at."""

    def __init__(
        self,
        first: float = 0.1,
        cap: float = 5.0,
        forget_after: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first = first
        self.cap = cap
        self.forget_after = forget_after
        self._clock = clock
        self._sources: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def delay(self, failures: int) -> float:
        return 0.0 if failures <= 0 else min(self.cap, self.first * 2 ** min(failures - 1, 30))

    def reserve(self, source: str) -> float:
        """Seconds this attempt must wait before its credentials are checked (0: at once)."""
        with self._lock:
            now = self._clock()
            entry = self._current(source, now)
            if entry is None:
                return 0.0
            start = max(now, entry.next_check)
            entry.next_check = start + self.delay(entry.count)
            return start - now

    def failed(self, source: str) -> None:
        with self._lock:
            now = self._clock()
            entry = self._current(source, now)
            if entry is None:
                self._make_room()
                entry = self._sources[source] = _Failures(0, now, now)
            entry.count += 1
            entry.last_failure = now
            entry.next_check = max(entry.next_check, now + self.delay(entry.count))

    def succeeded(self, source: str) -> None:
        with self._lock:
            self._sources.pop(source, None)

    def _current(self, source: str, now: float) -> _Failures | None:
        entry = self._sources.get(source)
        if entry is not None and now - entry.last_failure >= self.forget_after:
            del self._sources[source]
            return None
        return entry

    def _make_room(self) -> None:
        if len(self._sources) >= MAX_SOURCES:
            oldest = min(self._sources, key=lambda s: self._sources[s].last_failure)
            del self._sources[oldest]


def check_after_backoff(
    backoff: PasswordBackoff, source: str, check: Callable[[], bool], remaining: Callable[[], float]
) -> bool:
    """Wait out ``source``'s back-off (TimeoutError if ``remaining()`` is shorter), then
    ``check()`` and note the outcome."""
    wait = backoff.reserve(source)
    if wait > 0:
        if wait >= remaining():
            raise TimeoutError("password back-off longer than the handshake deadline")
        time.sleep(wait)
    ok = check()
    if ok:
        backoff.succeeded(source)
    else:
        backoff.failed(source)
    return ok
