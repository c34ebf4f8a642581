"""The server's half of UDP ASSOCIATE: the channel <-> datagrams to and from destinations."""

from __future__ import annotations

import contextlib
import logging
import socket

from server.destinations import Destinations
from utils.association import Association
from utils.base import ConnectionSockets
from utils.replyfilter import ReplyFilter
from utils.session import Stream
from utils.socks5 import Address, Reply
from utils.stopping import POLL_INTERVAL
from utils.udp import MAX_DATAGRAM, encode_channel_datagram, plain_ip

log = logging.getLogger("sockproxy.udp")

MAX_ANSWER = MAX_DATAGRAM - 19  # what still fits a channel frame with an IPv6 source


def open_udp_socket(sockets: ConnectionSockets) -> socket.socket:
    """A dual-stack socket (IPv4 through mapped addresses), or IPv4 only where v6 is off;
    ``sockets`` owns it from the start, so that a failed set-up closes it too."""
    try:
        sock = sockets.udp(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
    except OSError:
        sock = sockets.udp(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.bind(("0.0.0.0", 0))
        return sock
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    return sock


class ExitAssociation(Association):
    """Sends the local's datagrams to their destinations and returns the answers.

    Like a NAT with address-and-port-restricted filtering: only datagrams from a
    destination this association has sent to come back.
    """

    def __init__(
        self, stream: Stream, destinations: Destinations, udp_socket: socket.socket
    ) -> None:
        super().__init__(stream, destinations.config.timeouts.idle)
        self._destinations = destinations
        self._udp = udp_socket
        self._peers = ReplyFilter()

    def serve(self) -> str | None:
        """Relay until the local ends the stream; None, or why it was aborted."""
        self._udp.settimeout(POLL_INTERVAL)
        return self.run(self._uplink, self._downlink)

    def _uplink(self) -> None:
        self.datagrams_from_channel(self._send)

    def _send(self, destination: Address, data: bytes) -> None:
        target = self._resolve(destination)
        if target is None:
            return
        if self._peers.sent(target):  # before sending: the answer may be back before sendto returns
            log.warning(
                "UDP association reached %d destinations: forgetting the oldest", len(self._peers)
            )
        with contextlib.suppress(OSError):  # one unreachable destination must not end it all
            self._udp.sendto(data, self._socket_address(target))
            self.to_plain += len(data)
            self.touch()

    def _resolve(self, destination: Address) -> tuple[str, int] | None:
        """The destination's first allowed address (see server/destinations.py), or None."""
        allowed = self._destinations.resolve(destination, socket.SOCK_DGRAM)
        if isinstance(allowed, Reply):
            log.debug("dropped a datagram to %s: %s", destination, allowed.name.lower())
            return None
        host = str(allowed[0][1][0])
        return (plain_ip(host) if ":" in host else host), destination.port

    def _socket_address(self, target: tuple[str, int]) -> tuple[str, int]:
        if self._udp.family == socket.AF_INET6 and ":" not in target[0]:
            return f"::ffff:{target[0]}", target[1]
        return target

    def _downlink(self) -> None:
        while True:
            data, source = self.next_datagram(self._udp)
            peer = plain_ip(source[0]), source[1]
            if not self._peers.admits(peer) or len(data) > MAX_ANSWER:
                continue  # not an answer, or too big to frame with its address: dropped
            self.send(encode_channel_datagram(Address(*peer), data))
            self.to_channel += len(data)
            self.touch()
