"""Log lines an attacker can pace (refusals, failed handshakes), limited per source address.

Each source (an IPv4 address or an IPv6 /64) gets a token bucket (``burst`` lines at once,
then ``rate`` lines a second); what it is refused is counted, and at most every
``summary_interval`` seconds one line per source says how many were suppressed. Access lines
never go through here (a failed handshake still gets its one access line, with the reason):
only the extra warnings a stranger can make us write do.

``TokenBuckets`` is the arithmetic (no I/O, injectable clock); ``LimitedLog`` is the thread-safe
logger the servers own.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_SOURCES = 4096  # buckets kept at once; past it the oldest quarter is forgotten


@dataclass
class _Bucket:
    tokens: float
    updated: float
    suppressed: int = 0


class TokenBuckets:
    """A token bucket per source, plus the count of what each one was refused."""

    def __init__(
        self,
        rate: float = 1.0,
        burst: float = 5.0,
        summary_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.summary_interval = summary_interval
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._last_summary = clock()
        self._forgotten = 0  # suppressed lines of sources forgotten to make room

    def admit(self, source: str) -> bool:
        """Whether one more line from ``source`` may be written now."""
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            self._make_room()
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        bucket.suppressed += 1
        return False

    def due_summaries(self) -> list[tuple[str, int]]:
        """``(source, suppressed)`` for each source with suppressed lines, once per interval."""
        now = self._clock()
        if now - self._last_summary < self.summary_interval:
            return []
        self._last_summary = now
        due = [(s, b.suppressed) for s, b in self._buckets.items() if b.suppressed]
        for source, _ in due:
            self._buckets[source].suppressed = 0
        if self._forgotten:
            due.append(("other sources", self._forgotten))
            self._forgotten = 0
        return due

    def _make_room(self) -> None:
        """When full, forget the oldest quarter at once (amortised O(1) per new source);
        their suppressed counts go to one "other sources" count."""
        if len(self._buckets) < MAX_SOURCES:
            return
        for source in list(self._buckets)[: MAX_SOURCES // 4]:
            self._forgotten += self._buckets.pop(source).suppressed


def source_of(host: str) -> str:
    """What one bucket covers: an IPv4 address, or an IPv6 /64 (a host often holds a whole
    /64, so per address would let it rotate past the limit)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LimitedLog:
    """``warning(source, ...)`` writes unless ``source`` is over its rate; summaries follow."""

    def __init__(self, logger: logging.Logger, buckets: TokenBuckets | None = None) -> None:
        self._log = logger
        self._buckets = buckets or TokenBuckets()
        self._lock = threading.Lock()

    def warning(self, host: str, message: str, *args: object) -> bool:
        """Log ``message % args`` if ``host``'s source may; returns whether it was written."""
        source = source_of(host)
        with self._lock:
            admitted = self._buckets.admit(source)
        if admitted:
            self._log.warning(message, *args)
        self.flush()
        return admitted

    def flush(self) -> None:
        """Write the summaries that are due (also called from the accept loop)."""
        with self._lock:
            due = self._buckets.due_summaries()
        for source, count in due:
            self._log.warning("suppressed %d similar line(s) from %s", count, source)
