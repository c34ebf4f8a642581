"""The server's defence against replayed ClientInits: a clock window and a replay cache.

A ClientInit carries its creation time and 32 random bytes ``R``. The server accepts it
only within ``WINDOW`` seconds of its own clock and only if ``R`` has not been seen in
that time; the cache forgets an ``R`` once its ClientInit is too old to pass the window
anyway, so it holds at most the ClientInits of the last 2 x ``WINDOW`` seconds.

The cache lives in memory, so a restart empties it, and a recording made before the restart
could pass the window again. So the early data of a ClientInit stamped before the server's
start is held back until the local proves it is live (its first record under the new
session keys, which a recording cannot produce; the ServerResponse asks for it). What is
left: a local whose clock runs ahead of the server's by d seconds could have a ClientInit
from the last d seconds before a restart replayed once after it (keep clocks in sync).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from utils.errors import AuthenticationError

WINDOW = 60.0  # seconds a ClientInit's clock may differ from the server's
CAPACITY = 200_000  # ClientInits remembered at once (about 20 MB at the limit)


class Replayed(AuthenticationError):
    """A ClientInit that is stale, from the future, or seen before."""


class ReplayFilter:
    """Thread-safe: handler threads check ClientInits concurrently."""

    def __init__(
        self,
        window: float = WINDOW,
        capacity: int = CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._window = window
        self._capacity = capacity
        self._clock = clock
        self.started = clock()
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # R -> when to forget it
        self._lock = threading.Lock()

    def check(self, random: bytes, timestamp_ms: int) -> None:
        """Accept a ClientInit once; raise Replayed otherwise."""
        now = self._clock()
        stamp = timestamp_ms / 1000
        if abs(now - stamp) > self._window:
            raise Replayed(
                f"ClientInit clock differs by {now - stamp:+.0f} s (window {self._window:.0f} s)"
            )
        with self._lock:
            self._expire(now)
            if random in self._seen:
                raise Replayed("ClientInit replayed")
            if len(self._seen) >= self._capacity:
                raise Replayed("replay cache full")
            self._seen[random] = stamp + 2 * self._window

    def _expire(self, now: float) -> None:
        while self._seen:
            oldest, forget_at = next(iter(self._seen.items()))
            if forget_at > now:
                return
            del self._seen[oldest]

    def must_defer(self, timestamp_ms: int) -> bool:
        """Whether this ClientInit was made before the server started (so the cache,
        which started empty, cannot tell whether it has been used)."""
        return timestamp_ms / 1000 < self.started
