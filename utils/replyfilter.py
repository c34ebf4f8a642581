"""Which UDP sources may answer an association (sans-IO, with an injectable clock).

Like a NAT with address-and-port-restricted filtering (RFC 4787): a datagram from
``host:port`` comes back only if the association sent to ``host:port`` recently. Bounded as
a NAT's table is: an entry expires ``lifetime`` seconds after the last datagram sent to it
(RFC 4787 REQ-5 asks for at least 120 s; refreshed by outbound traffic only, REQ-6), and at
most ``capacity`` entries are kept, the least recently used going first when a new one
arrives. Memory per association is then at most ``capacity`` entries (~200 bytes each),
whatever the client sends to.

One thread calls ``sent`` (the uplink), another ``admits`` (the downlink): ``admits`` does a
single dict lookup, which the GIL makes atomic against the writer, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

Peer = tuple[str, int]

DEFAULT_LIFETIME = 300.0  # seconds: RFC 4787's recommended UDP mapping timeout (REQ-5)
DEFAULT_CAPACITY = 4096  # destinations per association at once


class ReplyFilter:
    """The recent destinations of one association, oldest first."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        lifetime: float = DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or lifetime <= 0:
            raise ValueError("capacity and lifetime must be positive")
        self.capacity = capacity
        self.lifetime = lifetime
        self._clock = clock
        self._sent_at: OrderedDict[Peer, float] = OrderedDict()
        self.evicted = 0  # entries pushed out by the cap (not by age)

    def __len__(self) -> int:
        return len(self._sent_at)

    def sent(self, peer: Peer) -> bool:
        """Note a datagram to ``peer``; True the first time the cap pushes an entry out."""
        now = self._clock()
        self._sent_at[peer] = now
        self._sent_at.move_to_end(peer)
        self._expire(now)
        if len(self._sent_at) <= self.capacity:
            return False
        self._sent_at.popitem(last=False)
        self.evicted += 1
        return self.evicted == 1

    def admits(self, peer: Peer) -> bool:
        """Whether a datagram from ``peer`` is an answer to something sent recently."""
        sent_at = self._sent_at.get(peer)
        return sent_at is not None and self._clock() - sent_at < self.lifetime

    def _expire(self, now: float) -> None:
        while self._sent_at:
            oldest, sent_at = next(iter(self._sent_at.items()))
            if now - sent_at < self.lifetime:
                return
            del self._sent_at[oldest]
