"""local.py's SOCKS5 front: negotiate with the client, open a tunnel, relay."""

from __future__ import annotations

import logging
import socket

from client.tunnel import Connector
from utils.base import AccessRecord, ProxyServer, TunnelHandler
from utils.channel import Deadline, recv_some
from utils.config import LocalConfig
from utils.errors import AuthenticationError, Socks5Error
from utils.socks5 import (
    CMD_CONNECT,
    METHOD_NO_ACCEPTABLE,
    Address,
    Credentials,
    Greeting,
    NeedData,
    Reply,
    Request,
    RequestReceived,
    Socks5ServerConnection,
    auth_status,
    build_reply,
    credentials_match,
    method_selection,
)

log = logging.getLogger("sockproxy.local")


class LocalServer(ProxyServer):
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.connector = Connector(config)
        super().__init__(
            (config.address, config.port), LocalHandler, config.whitelist, config.max_connections
        )


class LocalHandler(TunnelHandler):
    server: LocalServer

    def serve(self, record: AccessRecord) -> None:
        config = self.server.config
        self.idle_timeout = config.timeouts.idle
        client: socket.socket = self.request
        deadline = Deadline(config.timeouts.handshake)
        try:
            request, pending = self._negotiate(client, deadline)
        except Socks5Error as exc:
            if exc.reply is not None:
                client.sendall(build_reply(exc.reply))
            raise
        record.target = str(request.address)
        if request.command != CMD_CONNECT:
            client.sendall(build_reply(Reply.COMMAND_NOT_SUPPORTED))
            record.outcome = Reply.COMMAND_NOT_SUPPORTED.name.lower()
            return
        try:
            channel, reply, bind = self.server.connector.open(request, deadline)
        except BaseException:
            client.sendall(build_reply(Reply.GENERAL_FAILURE))
            raise
        client.sendall(build_reply(reply, bind))
        if reply != Reply.SUCCEEDED:
            channel.sock.close()
            record.outcome = reply.name.lower()
            return
        self.relay(client, channel, record, pending)

    def _negotiate(self, client: socket.socket, deadline: Deadline) -> tuple[Request, bytes]:
        """RFC 1928 method selection, RFC 1929 if configured, then the request."""
        config = self.server.config
        connection = Socks5ServerConnection(require_auth=config.auth)
        while True:
            event = connection.next_event()
            if isinstance(event, NeedData):
                connection.receive_data(recv_some(client, deadline))
            elif isinstance(event, Greeting):
                method = connection.choose_method(event.methods)
                client.sendall(method_selection(method))
                if method == METHOD_NO_ACCEPTABLE:
                    raise Socks5Error("no acceptable authentication method offered")
            elif isinstance(event, Credentials):
                ok = credentials_match(
                    config.username.encode(),
                    config.password.encode(),
                    event.username,
                    event.password,
                )
                client.sendall(auth_status(ok))
                if not ok:
                    raise AuthenticationError("wrong username or password")
            elif isinstance(event, RequestReceived):
                return event.request, connection.trailing_data()


__all__ = ["Address", "LocalHandler", "LocalServer"]
