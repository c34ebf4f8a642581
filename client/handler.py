"""local.py's front: SOCKS5, HTTP CONNECT, plain HTTP and SOCKS4 by the first byte; relay."""

from __future__ import annotations

import functools
import logging
import socket

from client.backoff import PasswordBackoff, check_after_backoff
from client.httpforward import HttpForwarder, read_head
from client.socks4 import serve_socks4
from client.tunnel import Connector
from client.udp import LocalAssociation
from utils.base import AccessRecord, ProxyServer, TunnelHandler
from utils.channel import Deadline, recv_some
from utils.config import LocalConfig
from utils.errors import AuthenticationError, Socks5Error
from utils.events import greeting_phase
from utils.handshake import MAX_EARLY_DATA
from utils.httpconnect import (
    HttpProxyError,
    looks_like_http,
    parse_head,
    response_for_reply,
    status_for_reply,
)
from utils.httpproxy import error_response, is_connect
from utils.platform_support import wait_readable
from utils.socks4 import SOCKS4_VERSION
from utils.socks5 import (
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
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
from utils.udp import plain_ip

log = logging.getLogger("sockproxy.local")

FAST_OPEN_WAIT = 0.02  # how long fast open waits for the client's first bytes (s)


class LocalServer(ProxyServer):
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.connector = Connector(config)
        self.backoff = PasswordBackoff()  # per source, after failed passwords
        super().__init__(
            (config.address, config.port), LocalHandler, config.whitelist, config.max_connections
        )

    def abort_all(self, reason: str, grace: float = 3.0) -> None:
        """Reset every live connection, then end the sessions cleanly."""
        super().abort_all(reason, grace)
        self.connector.end_all()


class LocalHandler(TunnelHandler):
    server: LocalServer

    def serve(self, record: AccessRecord) -> None:
        config = self.server.config
        self.idle_timeout = config.timeouts.idle
        client: socket.socket = self.request
        deadline = Deadline(config.timeouts.handshake)
        head = self._dispatch(client, deadline, record)
        if head is None:
            return
        http = bool(head)
        request, pending = self._greet(client, deadline, head)
        record.target = str(request.address)
        if request.command == CMD_UDP_ASSOCIATE:
            self._associate(client, request, deadline, record)
            return
        if request.command != CMD_CONNECT:
            client.sendall(build_reply(Reply.COMMAND_NOT_SUPPORTED))
            record.outcome = Reply.COMMAND_NOT_SUPPORTED.name.lower()
            return
        answer = _http_answer if http else _socks_answer
        if config.fast_open:
            client.sendall(answer(Reply.SUCCEEDED, None))
            self.sockets.promised()
            self._fast_open(client, request, deadline, record, pending)
            return
        try:
            stream, reply, bind = self.server.connector.open(request, deadline)
        except BaseException:
            client.sendall(answer(Reply.GENERAL_FAILURE, None))
            raise
        self.sockets.stream(stream)
        client.sendall(answer(reply, bind))
        if reply != Reply.SUCCEEDED:
            record.outcome = reply.name.lower()
            return
        self.relay(client, stream, record, pending)

    def _fast_open(
        self,
        client: socket.socket,
        request: Request,
        deadline: Deadline,
        record: AccessRecord,
        pending: bytes,
    ) -> None:
        """The client has its answer already: send its first bytes with the request, so the
        first response byte comes one round trip to the server later. A destination that
        cannot be reached then shows as a reset of the client's connection, not a REP code."""
        if not pending and wait_readable(client, FAST_OPEN_WAIT, None):
            pending = client.recv(MAX_EARLY_DATA - 512)  # b"" (an EOF) reappears in the relay
        stream, _, _ = self.server.connector.open(request, deadline, early=pending, wait=False)
        self.relay(client, self.sockets.stream(stream), record)

    def _dispatch(
        self, client: socket.socket, deadline: Deadline, record: AccessRecord
    ) -> bytes | None:
        """Serve SOCKS4 and plain HTTP here (None); else the HTTP CONNECT head, or b"" (SOCKS5)."""
        with greeting_phase(started=False):
            first = recv_some(client, deadline, 1, socket.MSG_PEEK)[0]
        if first == SOCKS4_VERSION:
            serve_socks4(self, client, deadline, record)
            return None
        if not looks_like_http(first):
            return b""
        with greeting_phase(started=True):
            head = read_head(client, deadline)
        if is_connect(head):
            return head
        HttpForwarder(self, client, record).serve(head)
        return None

    def _associate(
        self, client: socket.socket, request: Request, deadline: Deadline, record: AccessRecord
    ) -> None:
        """UDP ASSOCIATE: a relay port next to our TCP address, datagrams through the channel."""
        host = plain_ip(client.getsockname()[0])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        relay_socket = self.sockets.udp(socket.socket(family, socket.SOCK_DGRAM))
        try:
            relay_socket.bind((host, 0))
            stream, reply, _ = self.server.connector.open(request, deadline)
        except BaseException:
            client.sendall(build_reply(Reply.GENERAL_FAILURE))
            raise
        self.sockets.stream(stream)
        if reply != Reply.SUCCEEDED:
            client.sendall(build_reply(reply))
            record.outcome = reply.name.lower()
            return
        client.sendall(build_reply(Reply.SUCCEEDED, Address(host, relay_socket.getsockname()[1])))
        association = LocalAssociation(
            client,
            relay_socket,
            stream,
            client=(self.client_address[0], request.address.port),
            idle_timeout=self.idle_timeout,
        )
        record.relay = association
        association.serve()

    def _greet(
        self, client: socket.socket, deadline: Deadline, http_head: bytes
    ) -> tuple[Request, bytes]:
        """Negotiate in the client's protocol; answer its errors in that protocol."""
        try:
            if http_head:
                return self._negotiate_http(http_head)
            with greeting_phase(started=True):
                return self._negotiate(client, deadline)
        except Socks5Error as exc:
            if exc.reply is not None:
                client.sendall(build_reply(exc.reply))
            raise
        except HttpProxyError as exc:
            client.sendall(error_response(exc.status, exc.reason, str(exc), exc.status == 407))
            raise

    def _negotiate_http(self, buffer: bytes) -> tuple[Request, bytes]:
        config = self.server.config
        parsed = parse_head(buffer)
        if parsed is None:
            raise HttpProxyError(400, "Bad Request", "incomplete request head")
        connect, used = parsed
        if config.auth and not self.credentials_ok(connect.credentials):
            raise HttpProxyError(407, "Proxy Authentication Required", "wrong or no credentials")
        return Request(CMD_CONNECT, connect.address), buffer[used:]

    def credentials_ok(
        self, credentials: tuple[bytes, bytes] | None, deadline: Deadline | None = None
    ) -> bool:
        """Checked after this source's back-off (failed guesses slow the next ones)."""
        if credentials is None:
            return False  # no guess (a browser's first try): nothing to slow down
        config = self.server.config
        expected = config.username.encode(), config.password.encode()
        check = functools.partial(credentials_match, *expected, *credentials)
        wait = deadline or Deadline(config.timeouts.handshake)
        return check_after_backoff(
            self.server.backoff, self.client_address[0], check, wait.remaining
        )

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
                ok = self.credentials_ok((event.username, event.password), deadline)
                client.sendall(auth_status(ok))
                if not ok:
                    raise AuthenticationError("wrong username or password")
            elif isinstance(event, RequestReceived):
                return event.request, connection.trailing_data()


def _socks_answer(reply: Reply, bind: Address | None) -> bytes:
    return build_reply(reply, bind)


def _http_answer(reply: Reply, _bind: Address | None) -> bytes:
    """200, or the failure as a status with a one-line body that names it."""
    if reply == Reply.SUCCEEDED:
        return response_for_reply(reply)
    status, reason = status_for_reply(reply)
    if reply == Reply.GENERAL_FAILURE:
        text = "tunnel to the sockproxy server failed (see the local's log)"
    else:
        text = f"the sockproxy server could not connect: {reply.name.lower().replace('_', ' ')}"
    return error_response(status, reason, text)
