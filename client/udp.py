"""The local's half of UDP ASSOCIATE: the client's datagrams <-> the channel."""

from __future__ import annotations

import contextlib
import logging
import socket

from utils.association import Association
from utils.errors import Socks5Error
from utils.session import Stream
from utils.socks5 import Address
from utils.stopping import POLL_INTERVAL
from utils.udp import (
    build_socks_datagram,
    encode_channel_datagram,
    parse_socks_datagram,
    plain_ip,
)

log = logging.getLogger("sockproxy.udp")


class LocalAssociation(Association):
    """Lives as long as the client's TCP control connection (RFC 1928 section 7).

    Only datagrams from the client's own IP (and port, once known) are relayed; the rest
    are dropped, so nobody else can use the relay port.
    """

    def __init__(
        self,
        control: socket.socket,
        relay_socket: socket.socket,
        stream: Stream,
        *,
        client: tuple[str, int],
        idle_timeout: float,
    ) -> None:
        super().__init__(stream, idle_timeout)
        self._control = control
        self._udp = relay_socket
        self._client_ip = plain_ip(client[0])
        self._client: tuple[str, int] | None = None
        self._client_port = client[1]  # 0: learn it from the first datagram

    def serve(self) -> str | None:
        """Relay until the client closes its TCP connection; None, or why it was aborted."""
        self._control.settimeout(POLL_INTERVAL)
        self._udp.settimeout(POLL_INTERVAL)
        return self.run(self._watch_control, self._uplink, self._downlink)

    def _watch_control(self) -> None:
        """Returns when the client closes its TCP connection (what it sends there is dropped)."""
        while self.wait(lambda: self._control.recv(4096)):
            pass

    def _uplink(self) -> None:
        while True:
            data, source = self.next_datagram(self._udp)
            if not self._is_client(source):
                log.debug("dropped a datagram from %s: not the client", source[0])
                continue
            try:
                destination, payload = parse_socks_datagram(data)
            except Socks5Error as exc:
                log.debug("dropped a datagram: %s", exc)
                continue
            self.send(encode_channel_datagram(destination, payload))
            self.to_channel += len(payload)
            self.touch()

    def _is_client(self, source: tuple[str, int]) -> bool:
        if plain_ip(source[0]) != self._client_ip:
            return False
        if self._client_port and source[1] != self._client_port:
            return False
        self._client = (source[0], source[1])
        self._client_port = source[1]
        return True

    def _downlink(self) -> None:
        self.datagrams_from_channel(self._to_client)

    def _to_client(self, source: Address, data: bytes) -> None:
        if self._client is None:
            return
        with contextlib.suppress(OSError):  # e.g. EMSGSIZE: drop the datagram, as UDP would
            self._udp.sendto(build_socks_datagram(source, data), self._client)
            self.to_plain += len(data)
