"""The server's half of UDP ASSOCIATE: the channel <-> datagrams to and from destinations."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket

from utils.association import POLL_INTERVAL, Association
from utils.channel import Channel
from utils.config import ServerConfig
from utils.platform_support import recv_datagram
from utils.socks5 import Address
from utils.udp import MAX_DATAGRAM, encode_channel_datagram, plain_ip

log = logging.getLogger("sockproxy.udp")

MAX_ANSWER = MAX_DATAGRAM - 19  # what still fits a channel frame with an IPv6 source


def open_udp_socket() -> socket.socket:
    """A dual-stack socket (IPv4 through mapped addresses), or IPv4 only where v6 is off."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return _bound(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("0.0.0.0", 0))
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        sock.close()
        raise
    return _bound(sock, ("::", 0))


def _bound(sock: socket.socket, address: tuple[str, int]) -> socket.socket:
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class ExitAssociation(Association):
    """Sends the local's datagrams to their destinations and returns the answers.

    Like a NAT with address-and-port-restricted filtering: only datagrams from a
    destination this association has sent to come back.
    """

    def __init__(self, channel: Channel, config: ServerConfig) -> None:
        super().__init__(channel, config.timeouts.idle)
        self._config = config
        self._udp = open_udp_socket()
        self._peers: set[tuple[str, int]] = set()

    def serve(self) -> str | None:
        self._udp.settimeout(POLL_INTERVAL)
        try:
            return self.run(self._uplink, self._downlink)
        finally:
            self._udp.close()

    def _uplink(self) -> None:
        self.datagrams_from_channel(self._send)

    def _send(self, destination: Address, data: bytes) -> None:
        target = self._resolve(destination)
        if target is None:
            return
        self._peers.add(target)  # before sending: the answer may be back before sendto returns
        with contextlib.suppress(OSError):  # one unreachable destination must not end it all
            self._udp.sendto(data, self._socket_address(target))
            self.to_plain += len(data)
            self.touch()

    def _resolve(self, destination: Address) -> tuple[str, int] | None:
        """The destination's address if the rules allow it (names resolved here first)."""
        try:
            infos = socket.getaddrinfo(destination.host, destination.port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError):
            log.debug("dropped a datagram to %s: does not resolve", destination)
            return None
        for info in infos:
            host = plain_ip(str(info[4][0]))
            if self._config.destination_allowed(ipaddress.ip_address(host), destination.port):
                return host, destination.port
        log.warning("datagram to %s denied by the rules", destination)
        return None

    def _socket_address(self, target: tuple[str, int]) -> tuple[str, int]:
        if self._udp.family == socket.AF_INET6 and ":" not in target[0]:
            return f"::ffff:{target[0]}", target[1]
        return target

    def _downlink(self) -> None:
        while not self.stopping:
            received = recv_datagram(self._udp, MAX_DATAGRAM)  # None: timeout or ICMP reset
            if received is None:
                continue
            data, source = received
            peer = plain_ip(source[0]), source[1]
            if peer not in self._peers or len(data) > MAX_ANSWER:
                continue  # not an answer, or too big to frame with its address: dropped
            self.channel.send(encode_channel_datagram(Address(*peer), data))
            self.to_channel += len(data)
            self.touch()
