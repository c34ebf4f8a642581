"""How many tunnels one key may hold at once (thread-safe counters, by key name).

Every tunnel counts against ``max_connections_per_key``; a UDP association counts against
``max_udp_associations_per_key`` as well. The defaults (1024, what one local with its
default max_connections can ask for, and 64) are far above what one person's browser uses,
so only a runaway or abusive key meets them.
"""

from __future__ import annotations

import threading
from collections import Counter


class KeyLimits:
    """Counters per key name with a ceiling: ``acquire`` says yes or no, ``release`` undoes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, name: str) -> bool:
        with self._lock:
            if self._held[name] >= self.limit:
                return False
            self._held[name] += 1
            return True

    def release(self, name: str) -> None:
        with self._lock:
            self._held[name] -= 1
            if self._held[name] <= 0:
                del self._held[name]  # a key that holds nothing takes no memory

    def held(self, name: str) -> int:
        with self._lock:
            return self._held[name]


class TunnelLimits:
    """``max_connections_per_key`` for every tunnel, ``max_udp_associations_per_key`` for UDP."""

    def __init__(self, connections: int, udp_associations: int) -> None:
        self.connections = KeyLimits(connections)
        self.udp_associations = KeyLimits(udp_associations)

    def admit(self, name: str, udp: bool) -> str | None:
        """Count a new tunnel of key ``name``; None if within the limits, else the field
        that refused it (and nothing is counted)."""
        if not self.connections.acquire(name):
            return "max_connections_per_key"
        if udp and not self.udp_associations.acquire(name):
            self.connections.release(name)
            return "max_udp_associations_per_key"
        return None

    def release(self, name: str, udp: bool) -> None:
        self.connections.release(name)
        if udp:
            self.udp_associations.release(name)
