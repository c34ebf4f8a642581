"""The threaded skeleton both sides of a UDP association share (the codec is utils/udp.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

from utils.base import describe, quietly_shutdown
from utils.channel import Channel
from utils.errors import SockproxyError
from utils.socks5 import Address
from utils.udp import DatagramDecoder
from utils.workers import Completion

POLL_INTERVAL = 0.5  # how often blocked threads look at the stop flag


class Association:
    """Workers move datagrams until one side ends, the association idles out or fails."""

    def __init__(self, channel: Channel, idle_timeout: float) -> None:
        self.channel = channel
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
        quietly_shutdown(self.channel.sock, socket.SHUT_RDWR)

    def touch(self) -> None:
        self._last_activity = time.monotonic()

    def check_idle(self) -> None:
        if time.monotonic() - self._last_activity >= self.idle_timeout:
            raise TimeoutError("idle timeout")

    def run(self, main: Callable[[], None], *workers: Callable[[], None]) -> str | None:
        """Run ``workers`` in threads and ``main`` here; when any returns, stop them all."""
        # A long timeout: a send that waits on a full buffer must not fail after a poll
        # interval. The reader is woken by SHUT_RD when the association stops.
        self.channel.sock.settimeout(self.idle_timeout)
        tasks = [Completion(self._guard, work) for work in workers]
        self._guard(main)
        quietly_shutdown(self.channel.sock, socket.SHUT_RD)
        for task in tasks:
            task.join()
        if not self._aborted:
            with contextlib.suppress(OSError, SockproxyError):
                self.channel.send_end()
        quietly_shutdown(self.channel.sock, socket.SHUT_RDWR)
        self.channel.sock.close()
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
                payloads = self.channel.receive()
            except TimeoutError:
                self.check_idle()
                continue
            if not payloads:
                return
            self.touch()
            for payload in payloads:
                for address, data in decoder.feed(payload):
                    handle(address, data)
