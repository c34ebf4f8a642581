"""The threaded skeleton both sides of a UDP association share (the codec is utils/udp.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from utils.errors import SockproxyError
from utils.events import describe
from utils.session import Stream
from utils.socks5 import Address
from utils.udp import DatagramDecoder
from utils.workers import Completion

POLL_INTERVAL = 0.5  # how often blocked threads look at the stop flag


class Association:
    """Workers move datagrams until one side ends, the association idles out or fails."""

    def __init__(self, stream: Stream, idle_timeout: float) -> None:
        self.stream = stream
        self.idle_timeout = idle_timeout
        self.to_channel = 0
        self.to_plain = 0
        self.failure: str | None = None
        self._stop = threading.Event()
        self._aborted = False
        self._last_activity = time.monotonic()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def abort(self, reason: str) -> None:
        """Stop at once: no end of stream is sent, so the peer sees the cut."""
        if self.failure is None:
            self.failure = reason
        self._aborted = True
        self._stop.set()
        self.stream.abort(reason)

    def send(self, payload: bytes) -> None:
        """One framed datagram into the stream (waits while the peer's window is full)."""
        self.stream.send(payload, self.idle_timeout)

    def touch(self) -> None:
        self._last_activity = time.monotonic()

    def check_idle(self) -> None:
        if time.monotonic() - self._last_activity >= self.idle_timeout:
            raise TimeoutError("idle timeout")

    def run(self, main: Callable[[], None], *workers: Callable[[], None]) -> str | None:
        """Run ``workers`` in threads and ``main`` here; when any returns, stop them all."""
        tasks = [Completion(self._guard, work) for work in workers]
        self._guard(main)
        for task in tasks:  # each looks at the stop flag at least every POLL_INTERVAL
            task.join()
        if not self._aborted:
            with contextlib.suppress(OSError, SockproxyError):
                self.stream.send_end()
        return self.failure

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except (OSError, SockproxyError) as exc:
            if not self.stopping:
                self.failure = describe(exc)
                self._aborted = True  # a record may be half-sent: no end of stream after it
        finally:
            self._stop.set()

    def datagrams_from_channel(self, handle: Callable[[Address, bytes], None]) -> None:
        """Call ``handle`` for each datagram the peer sends, until it ends the channel."""
        decoder = DatagramDecoder()
        while not self.stopping:
            try:
                payloads = self.stream.receive(POLL_INTERVAL)
            except TimeoutError:
                self.check_idle()
                continue
            if not payloads:
                return
            self.touch()
            for payload in payloads:
                for address, data in decoder.feed(payload):
                    handle(address, data)
                self.stream.consumed(len(payload))
