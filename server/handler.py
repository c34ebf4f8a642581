"""server.py's side: accept a tunnel, run the handshake, connect to the destination, relay."""

from __future__ import annotations

import logging
import socket

from server.destinations import Destinations
from server.limits import TunnelLimits
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


class ExitServer(ProxyServer):
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.tickets = TicketStore(config.resumption_lifetime)
        self.destinations = Destinations(config)
        self.limits = TunnelLimits(
            config.max_connections_per_key, config.max_udp_associations_per_key
        )
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
    _held: tuple[str, bool] | None = None  # (key name, is UDP) counted in server.limits

    def serve(self, record: AccessRecord) -> None:
        config = self.server.config
        self.idle_timeout = config.timeouts.idle
        deadline = Deadline(config.timeouts.handshake)
        handshake = ServerHandshake(config.private_key, self.server.authorized, self.server.tickets)
        try:
            channel = server_handshake(self.request, handshake, deadline)
        except (OSError, SockproxyError) as exc:
            # Quiet towards the peer (we just close), explicit in our log.
            self.server.limited_log.warning(
                self.client_address[0], "handshake from %s failed: %s", record.client, describe(exc)
            )
            raise
        record.identity = handshake.peer_name + (" resumed" if handshake.resumed else "")
        try:
            request = decode_tunnel_request(channel.receive_message(deadline))
            record.target = str(request.address)
            refusal = self._hold_slot(handshake.peer_name, request.command == CMD_UDP_ASSOCIATE)
            if refusal is None and request.command == CMD_UDP_ASSOCIATE:
                self._associate(channel, record)
                return
            target, reply = self._connect(request) if refusal is None else (None, refusal)
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

    def _hold_slot(self, key_name: str, udp: bool) -> Reply | None:
        """Count this tunnel against its key's limits until ``finish``; a REP if over."""
        field = self.server.limits.admit(key_name, udp)
        if field is not None:
            log.warning("refused a tunnel of key %s: %s reached", key_name, field)
            return Reply.GENERAL_FAILURE
        self._held = key_name, udp
        return None

    def finish(self) -> None:
        if self._held is not None:
            self.server.limits.release(*self._held)
        super().finish()

    def _associate(self, channel: Channel, record: AccessRecord) -> None:
        association = ExitAssociation(channel, self.server.destinations)  # its socket first
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
        allowed = self.server.destinations.resolve(request.address, socket.SOCK_STREAM)
        if isinstance(allowed, Reply):
            return None, allowed
        last_error: OSError = OSError("no address")
        deadline = Deadline(config.timeouts.connect)  # for all addresses together
        for family, sockaddr in allowed:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                deadline.arm(sock)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            return sock, Reply.SUCCEEDED
        return None, reply_for_error(last_error)
