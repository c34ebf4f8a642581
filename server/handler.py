"""server.py's side: accept a tunnel, run the handshake, connect to the destination, relay."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

from server.udp import ExitAssociation
from utils.base import AccessRecord, ProxyServer, TunnelHandler, describe, set_nodelay
from utils.channel import Channel, Deadline, server_handshake
from utils.config import AuthorizedKey, ServerConfig
from utils.errors import SockproxyError
from utils.handshake import (
    PRIVATE_KEY_OPERATIONS,
    AuthorizedPeer,
    ServerHandshake,
    TicketStore,
)
from utils.socks5 import (
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    Address,
    Reply,
    Request,
    decode_tunnel_request,
    encode_tunnel_reply,
    reply_for_error,
)

log = logging.getLogger("sockproxy.server")

NO_ADDRESS = Address("0.0.0.0", 0)


def _resolve(address: Address) -> list[tuple[Any, ...]]:
    """getaddrinfo, without the resolver round trip for an IP literal (most requests)."""
    if address.atyp == ATYP_IPV4:
        return [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (address.host, address.port))]
    if address.atyp == ATYP_IPV6:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 0, "", (address.host, address.port, 0, 0))]
    return socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)


class ExitServer(ProxyServer):
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.tickets = TicketStore(config.resumption_lifetime)
        self.authorized: dict[bytes, AuthorizedPeer] = {}
        self.set_authorized_keys(config.authorized_keys)
        super().__init__(
            (config.address, config.port), ExitHandler, config.whitelist, config.max_connections
        )

    def summary(self) -> list[str]:
        lines = super().summary()
        lines.append(f"rsa private-key operations so far: {PRIVATE_KEY_OPERATIONS.value}")
        return lines

    def set_authorized_keys(self, keys: tuple[AuthorizedKey, ...]) -> None:
        """Swap in a new key list; tickets of keys that are gone stop working at once."""
        table = {key.fingerprint: AuthorizedPeer(key.name, key.key) for key in keys}
        self.authorized = table  # one assignment: handshakes see the old or the new table
        self.tickets.keep_only(table.keys())


class ExitHandler(TunnelHandler):
    server: ExitServer
    plain_is_client = False

    def serve(self, record: AccessRecord) -> None:
        config = self.server.config
        self.idle_timeout = config.timeouts.idle
        deadline = Deadline(config.timeouts.handshake)
        handshake = ServerHandshake(config.private_key, self.server.authorized, self.server.tickets)
        try:
            channel = server_handshake(self.request, handshake, deadline)
        except (OSError, SockproxyError) as exc:
            # Quiet towards the peer (we just close), explicit in our log.
            log.warning("handshake from %s failed: %s", record.client, describe(exc))
            raise
        record.identity = handshake.peer_name + (" resumed" if handshake.resumed else "")
        try:
            request = decode_tunnel_request(channel.receive_message(deadline))
            record.target = str(request.address)
            if request.command == CMD_UDP_ASSOCIATE:
                self._associate(channel, record)
                return
            target, reply = self._connect(request)
        except BaseException:
            channel.sock.close()
            raise
        if target is None:
            record.outcome = reply.name.lower()
            self._refuse(channel, reply)
            return
        try:
            set_nodelay(target)
            host, port = target.getsockname()[:2]
            channel.send_message(encode_tunnel_reply(Reply.SUCCEEDED, Address(host, port)))
        except BaseException:
            target.close()
            channel.sock.close()
            raise
        self.relay(target, channel, record)

    def _associate(self, channel: Channel, record: AccessRecord) -> None:
        association = ExitAssociation(channel, self.server.config)  # its socket first
        channel.send_message(encode_tunnel_reply(Reply.SUCCEEDED, NO_ADDRESS))
        record.relay = association
        failure = association.serve()
        if failure is not None:
            record.outcome = f"aborted: {failure}"

    @staticmethod
    def _refuse(channel: Channel, reply: Reply) -> None:
        try:
            channel.send_message(encode_tunnel_reply(reply, NO_ADDRESS))
            channel.send_end()
        finally:
            channel.sock.close()

    def _connect(self, request: Request) -> tuple[socket.socket | None, Reply]:
        """Resolve (here, not at the local), check the rules, connect: a socket or a REP code."""
        if request.command != CMD_CONNECT:
            return None, Reply.COMMAND_NOT_SUPPORTED
        config = self.server.config
        address = request.address
        try:
            candidates = _resolve(address)
        except UnicodeError:  # the idna codec refuses the name (e.g. a label over 63 bytes)
            return None, Reply.HOST_UNREACHABLE
        except OSError as exc:
            return None, reply_for_error(exc)
        allowed = [
            info
            for info in candidates
            if config.destination_allowed(ipaddress.ip_address(info[4][0]), address.port)
        ]
        if not allowed:
            log.warning("destination %s denied by the rules", address)
            return None, Reply.NOT_ALLOWED
        last_error: OSError = OSError("no address")
        deadline = Deadline(config.timeouts.connect)  # for all addresses together
        for family, kind, proto, _, sockaddr in allowed:
            sock = socket.socket(family, kind, proto)
            try:
                deadline.arm(sock)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            return sock, Reply.SUCCEEDED
        return None, reply_for_error(last_error)
