"""A userspace delay relay: one TCP path with one-way delay d, for a kernel without netem.

It listens on 127.0.0.1 and forwards every connection it accepts to one upstream address,
modelling what a real path of round-trip time RTT = 2d does to the two endpoints:

- the upstream connection is opened 1.5 RTT (3d) after the client connected: a real server
  accepts when the client's final ACK of the TCP handshake reaches it;
- a byte the client sends at t reaches the server at max(t, 2d) + d: on loopback the
  client's connect returns at once, on the real path not before the SYN-ACK (2d);
- a byte the server sends at t reaches the client at t + d;
- order is kept, a half-close (EOF) is delayed like data, a reset is passed on (as a reset,
  when its turn comes). Bandwidth and buffers are unlimited: this is for latency, not bulk.

One thread runs everything: a selector loop that receives whatever is readable, stamps it
with its due time (time.monotonic) and queues it, and sends each queued item when its time
comes, the loop's timeout being the next due time. No thread hand-offs, so the error
against the model is the wake-up latency of one select() (~0.1 ms on an idle machine).

``observer`` (optional) sees every event in the order the relay receives it: a link opened,
bytes up (client -> server) or down, a link closed. With ``one_way_delay=0`` this is the
causal order of a request/response protocol, which tests/test_round_trips.py uses to count
round trips without a clock. ``python3 bench/delayrelay.py --help`` runs one on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import itertools
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

UP: Literal["up"] = "up"  # client -> server
DOWN: Literal["down"] = "down"  # server -> client
OPEN: Literal["open"] = "open"
CLOSE: Literal["close"] = "close"
EventKind = Literal["up", "down", "open", "close"]

CHUNK = 65536
IDLE_WAIT = 0.5  # the loop's longest sleep when nothing is due
JOIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class LinkEvent:
    """Something the relay saw: ``size`` bytes up or down (0: EOF), a link opening or closing."""

    link: int  # 0, 1, 2... in accept order
    kind: EventKind
    size: int = 0


Observer = Callable[[LinkEvent], None]


@dataclass
class _Item:
    due: float
    data: bytes  # b"": EOF
    reset: bool = False


@dataclass
class _Direction:
    """One way through a link: what was received from ``source`` and waits for ``target``."""

    kind: EventKind
    source: socket.socket | None
    target: socket.socket | None
    queue: deque[_Item] = field(default_factory=deque)
    unsent: memoryview | None = None  # the rest of an item the target would not take yet
    reading: bool = True
    delivered_eof: bool = False


class _Link:
    """One relayed connection (its client socket, later its upstream socket)."""

    def __init__(self, number: int, client: socket.socket, accepted_at: float) -> None:
        self.number = number
        self.client = client
        self.server: socket.socket | None = None
        self.connected = False
        self.accepted_at = accepted_at
        self.up = _Direction(UP, client, None)
        self.down = _Direction(DOWN, None, client)
        self.ended = False

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.server) if s is not None]


def _reset_on_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DelayRelay:
    """Listens on ``host``:``port`` (0: a free port) and relays each connection to ``upstream``.

    ``one_way_delay`` is d in seconds (RTT = 2d). Use as a context manager, or call
    ``start()`` and ``close()``; ``close()`` resets the links still open.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        one_way_delay: float,
        observer: Observer | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if one_way_delay < 0:
            raise ValueError("the delay cannot be negative")
        self.upstream = upstream
        self.delay = one_way_delay
        self._observer = observer
        self._listener = socket.create_server((host, port), backlog=1024)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._links: set[_Link] = set()
        self._count = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="delayrelay", daemon=True)

    # ------------------------------------------------------------------ lifetime

    def start(self) -> DelayRelay:
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._selector.register(self._waker_r, selectors.EVENT_READ, self._woken)
        self._thread.start()
        return self

    def __enter__(self) -> DelayRelay:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, reset every open link, end the loop's thread."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._waker_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT)
        self._waker_w.close()

    def _run(self) -> None:
        try:
            while not self._closing:
                for key, mask in self._selector.select(self._next_timeout()):
                    key.data(key.fileobj, mask)
                self._run_due_timers()
        finally:
            for link in list(self._links):
                self._abort(link)
            self._selector.close()
            self._listener.close()
            self._waker_r.close()

    def _woken(self, _sock: socket.socket, _mask: int) -> None:
        with contextlib.suppress(OSError):
            self._waker_r.recv(64)

    # ------------------------------------------------------------------ timers

    def _at(self, due: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (due, next(self._sequence), action))

    def _next_timeout(self) -> float:
        if not self._timers:
            return IDLE_WAIT
        return max(0.0, min(IDLE_WAIT, self._timers[0][0] - time.monotonic()))

    def _run_due_timers(self) -> None:
        while self._timers and self._timers[0][0] <= time.monotonic():
            _, _, action = heapq.heappop(self._timers)
            action()

    def _notify(self, link: _Link, kind: EventKind, size: int = 0) -> None:
        if self._observer is not None:
            self._observer(LinkEvent(link.number, kind, size))

    # ------------------------------------------------------------------ the model

    def _due(self, direction: _Direction, link: _Link, now: float) -> float:
        if direction is link.up:
            return max(now, link.accepted_at + 2 * self.delay) + self.delay
        return now + self.delay

    # ------------------------------------------------------------------ accepting, connecting

    def _accept(self, _sock: socket.socket, _mask: int) -> None:
        while True:  # all that wait: a burst arrives at once
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        link = _Link(self._count, client, time.monotonic())
        self._count += 1
        client.setblocking(False)
        _nodelay(client)
        self._links.add(link)
        self._notify(link, OPEN)
        self._watch(link, client)
        self._at(link.accepted_at + 3 * self.delay, lambda: self._connect(link))

    def _connect(self, link: _Link) -> None:
        if link.ended:
            return
        server = socket.socket(socket.AF_INET6 if ":" in self.upstream[0] else socket.AF_INET)
        server.setblocking(False)
        _nodelay(server)
        link.server = server
        link.up.target = server
        link.down.source = server
        code = server.connect_ex(self.upstream)
        if code not in (0, errno.EINPROGRESS):
            self._abort(link)  # refused: the client sees a reset, as on a real path
            return
        self._selector.register(server, selectors.EVENT_WRITE, self._connected(link))

    def _connected(self, link: _Link) -> Callable[[socket.socket, int], None]:
        def done(server: socket.socket, _mask: int) -> None:
            if server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                self._abort(link)
                return
            link.connected = True
            self._selector.unregister(server)
            self._watch(link, server)
            self._flush(link, link.up)

        return done

    # ------------------------------------------------------------------ moving bytes

    def _watch(self, link: _Link, sock: socket.socket) -> None:
        """Register ``sock`` for what its link needs from it now (read, write, both, none)."""
        mask = 0
        for direction in (link.up, link.down):
            if direction.source is sock and direction.reading:
                mask |= selectors.EVENT_READ
            if direction.target is sock and direction.unsent is not None:
                mask |= selectors.EVENT_WRITE
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            if mask:
                self._selector.register(sock, mask, self._ready(link))
            return
        if not mask:
            self._selector.unregister(sock)
        elif key.events != mask:
            self._selector.modify(sock, mask, key.data)

    def _ready(self, link: _Link) -> Callable[[socket.socket, int], None]:
        def ready(sock: socket.socket, mask: int) -> None:
            for direction in (link.up, link.down):
                if link.ended:
                    return
                if mask & selectors.EVENT_READ and direction.source is sock:
                    self._receive(link, direction, sock)
                if mask & selectors.EVENT_WRITE and direction.target is sock:
                    self._flush(link, direction)

        return ready

    def _receive(self, link: _Link, direction: _Direction, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, reset = b"", True
        else:
            reset = False
        now = time.monotonic()
        self._notify(link, direction.kind, len(data))
        if not data:
            direction.reading = False
            self._watch(link, sock)
        item = _Item(self._due(direction, link, now), data, reset)
        direction.queue.append(item)
        if len(direction.queue) == 1 and direction.unsent is None:
            self._at(item.due, lambda: self._flush(link, direction))

    def _flush(self, link: _Link, direction: _Direction) -> None:
        """Send what is due, in order; come back when the next item is due or writable."""
        target = direction.target
        if link.ended or target is None or (target is link.server and not link.connected):
            return
        while direction.unsent is not None or direction.queue:
            if direction.unsent is None:
                item = direction.queue[0]
                if item.due > time.monotonic():
                    self._at(item.due, lambda: self._flush(link, direction))
                    return
                direction.queue.popleft()
                if item.reset:
                    self._abort(link)
                    return
                if not item.data:
                    self._end_direction(link, direction, target)
                    return
                direction.unsent = memoryview(item.data)
            if not self._send(link, direction, target):
                return
        self._watch(link, target)

    def _send(self, link: _Link, direction: _Direction, target: socket.socket) -> bool:
        """Send the unsent item; False if the target is full (or the link broke)."""
        assert direction.unsent is not None
        try:
            sent = target.send(direction.unsent)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._abort(link)
            return False
        rest = direction.unsent[sent:]
        direction.unsent = rest if len(rest) else None
        if direction.unsent is not None:
            self._watch(link, target)  # wait until writable
            return False
        return True

    # ------------------------------------------------------------------ ending

    def _end_direction(self, link: _Link, direction: _Direction, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
        direction.delivered_eof = True
        self._watch(link, target)
        if link.up.delivered_eof and link.down.delivered_eof:
            self._finish(link, reset=False)

    def _abort(self, link: _Link) -> None:
        """Both ends get a reset; whatever was queued is dropped."""
        self._finish(link, reset=True)

    def _finish(self, link: _Link, *, reset: bool) -> None:
        if link.ended:
            return
        link.ended = True
        for sock in link.sockets():
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            if reset:
                _reset_on_close(sock)
            sock.close()
        self._links.discard(link)
        self._notify(link, CLOSE)


def _stop(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    p.add_argument("--upstream-port", type=int, required=True, help="relay to 127.0.0.1:PORT")
    p.add_argument("--rtt-ms", type=float, required=True, help="round-trip time (twice the delay)")
    p.add_argument(
        "--nice", type=int, default=0, help="add this to the niceness (negative: root only)"
    )
    args = p.parse_args(argv)
    if args.nice:
        with contextlib.suppress(OSError):  # not allowed: run at the normal priority
            os.nice(args.nice)
    signal.signal(signal.SIGTERM, _stop)
    with DelayRelay(("127.0.0.1", args.upstream_port), args.rtt_ms / 2000, port=args.port):
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
