"""The threaded skeleton both sides of a UDP association share (the codec is utils/udp.py)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

from utils.errors import SockproxyError
from utils.platform_support import recv_datagram
from utils.socks5 import Address
from utils.stopping import POLL_INTERVAL, Tunnel
from utils.udp import MAX_DATAGRAM, DatagramDecoder


class Association(Tunnel):
    """Workers move datagrams until one side ends, the association idles out or fails.

    Its sockets belong to the connection (utils/base.py ``ConnectionSockets``); each is set
    to time out every POLL_INTERVAL here, so that its reader looks for a stop.
    """

    def run(self, main: Callable[[], None], *workers: Callable[[], None]) -> str | None:
        """Run them all until one of them returns; then the end of stream, unless aborted."""
        failure = super().run(*(self._stopping_all(work) for work in (main, *workers)))
        if failure is None:
            with contextlib.suppress(OSError, SockproxyError):
                self.stream.send_end()
        return failure

    def _stopping_all(self, work: Callable[[], None]) -> Callable[[], None]:
        def run_then_stop() -> None:
            work()
            self.stop()

        return run_then_stop

    def send(self, payload: bytes) -> None:
        """One framed datagram into the stream (waits while the peer's window is full)."""
        self.stream.send(payload, self.idle_timeout)

    def datagrams_from_channel(self, handle: Callable[[Address, bytes], None]) -> None:
        """Call ``handle`` for each datagram the peer sends, until it ends the channel."""
        decoder = DatagramDecoder()
        while payloads := self.wait(lambda: self.stream.receive(POLL_INTERVAL)):
            self.touch()
            for payload in payloads:
                for address, data in decoder.feed(payload):
                    handle(address, data)
                self.stream.consumed(len(payload))

    def next_datagram(self, sock: socket.socket) -> tuple[bytes, Any]:
        """The next datagram that reaches ``sock`` (a UDP socket with POLL_INTERVAL as its
        timeout); whether it moves the association on is the caller's to say (``touch``)."""
        return self.wait(lambda: _received(recv_datagram(sock, MAX_DATAGRAM)))


def _received(datagram: tuple[bytes, Any] | None) -> tuple[bytes, Any]:
    if datagram is None:  # a timeout, or the ICMP error of an earlier send
        raise TimeoutError("no datagram yet")
    return datagram
