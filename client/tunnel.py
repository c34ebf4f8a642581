"""Opening tunnels from the local to its server(s): handshake, resumption, failover."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from Crypto.PublicKey.RSA import RsaKey

from utils.base import describe, set_nodelay
from utils.channel import Channel, Deadline, client_handshake
from utils.config import LocalConfig, ServerEndpoint
from utils.errors import ProtocolError, SockproxyError
from utils.handshake import ClientHandshake, Ticket
from utils.socks5 import Address, Reply, Request, decode_tunnel_reply, encode_tunnel_request

log = logging.getLogger("sockproxy.tunnel")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


class TunnelUnavailable(SockproxyError):
    """No server could be reached or would complete a handshake."""


class TicketCache:
    """The local's resumption ticket for one server, shared by all connections.

    When there is no ticket, one connection runs the full handshake while the others
    wait for the ticket it leaves, so a burst of connections costs one RSA handshake.
    """

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._ticket: Ticket | None = None
        self._lock = threading.Lock()
        self._leader = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.lifetime > 0

    def current(self) -> Ticket | None:
        with self._lock:
            if self._ticket is not None and self._ticket.expires_at <= time.monotonic():
                self._ticket = None
            return self._ticket

    def store(self, ticket: Ticket | None) -> None:
        if ticket is not None and self.enabled:
            with self._lock:
                self._ticket = ticket

    def forget(self, ticket: Ticket) -> None:
        """The server refused ``ticket`` (restarted, expired it, or has resumption off)."""
        with self._lock:
            if self._ticket is ticket:
                self._ticket = None

    @contextlib.contextmanager
    def full_handshake_turn(self, deadline: Deadline) -> Iterator[Ticket | None]:
        """Wait for our turn at a full handshake; yields a ticket if one appeared meanwhile."""
        if not self.enabled:
            yield None
            return
        if not self._leader.acquire(timeout=deadline.remaining()):
            raise TimeoutError("waiting for another connection's handshake")
        try:
            yield self.current()
        finally:
            self._leader.release()


@dataclass
class ServerState:
    """One configured server, its tickets and its failure back-off."""

    endpoint: ServerEndpoint
    tickets: TicketCache
    failures: int = 0
    retry_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        host = self.endpoint.address
        return f"[{host}]:{self.endpoint.port}" if ":" in host else f"{host}:{self.endpoint.port}"

    def available(self, now: float) -> bool:
        return now >= self.retry_at

    def failed(self) -> None:
        with self._lock:
            self.failures += 1
            delay = min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)
            self.retry_at = time.monotonic() + delay

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0
            self.retry_at = 0.0


class Connector:
    """Opens a channel to the first server that works and asks it for the destination."""

    def __init__(self, config: LocalConfig) -> None:
        self._identity: RsaKey = config.private_key
        self._connect_timeout = config.timeouts.connect
        self._lifetime = config.resumption_lifetime
        self.servers = [
            ServerState(ep, TicketCache(config.resumption_lifetime)) for ep in config.servers
        ]

    def open(self, request: Request, deadline: Deadline) -> tuple[Channel, Reply, Address]:
        """A channel whose server has answered ``request``, with its reply and bind address."""
        last_error: BaseException | None = None
        servers = self._in_order()
        for index, server in enumerate(servers):
            try:
                left = deadline.remaining()
            except TimeoutError:
                break  # out of time: the servers not tried have not failed
            # Each server gets a fair share of what is left, so one that hangs cannot
            # use up the time of the ones behind it.
            share = Deadline(left / (len(servers) - index))
            try:
                channel = self._handshake(server, share, encode_tunnel_request(request))
            except (OSError, SockproxyError) as exc:
                server.failed()
                log.warning("server %s failed: %s", server.name, describe(exc))
                last_error = exc
                continue
            server.succeeded()
            return (channel, *self._answer(channel, deadline))
        raise TunnelUnavailable(f"no server available ({describe(last_error or TimeoutError())})")

    def _in_order(self) -> list[ServerState]:
        """Servers not in back-off first, in config order; then the rest as a last resort."""
        now = time.monotonic()
        ready = [s for s in self.servers if s.available(now)]
        return ready + [s for s in self.servers if not s.available(now)]

    @staticmethod
    def _answer(channel: Channel, deadline: Deadline) -> tuple[Reply, Address]:
        """The server's reply to the request that went out with the handshake."""
        try:
            return decode_tunnel_reply(channel.receive_message(deadline))
        except BaseException:
            channel.sock.close()
            raise

    def _handshake(self, server: ServerState, deadline: Deadline, request: bytes) -> Channel:
        """Resume if we hold a ticket; else (or if the server refuses it) a full handshake.

        A server that cannot be reached fails at once (for failover); only a server that
        answers and then closes on our ticket makes us forget it and start over.
        """
        ticket = server.tickets.current()
        if ticket is None:
            with server.tickets.full_handshake_turn(deadline) as fresh:
                if fresh is None:
                    return self._attempt(server, None, deadline, request)
            ticket = fresh  # another connection's full handshake left one meanwhile
        sock = self._connect(server.endpoint, deadline)  # unreachable: failover, not a refusal
        try:
            return self._run(server, sock, ticket, deadline, request)
        except (OSError, ProtocolError) as exc:
            server.tickets.forget(ticket)
            log.info("resumption with %s failed (%s); full handshake", server.name, describe(exc))
        return self._attempt(server, None, deadline, request)

    def _attempt(
        self, server: ServerState, ticket: Ticket | None, deadline: Deadline, request: bytes
    ) -> Channel:
        return self._run(
            server, self._connect(server.endpoint, deadline), ticket, deadline, request
        )

    def _connect(self, endpoint: ServerEndpoint, deadline: Deadline) -> socket.socket:
        timeout = min(self._connect_timeout, deadline.remaining())
        sock = socket.create_connection((endpoint.address, endpoint.port), timeout=timeout)
        set_nodelay(sock)
        return sock

    def _run(
        self,
        server: ServerState,
        sock: socket.socket,
        ticket: Ticket | None,
        deadline: Deadline,
        request: bytes,
    ) -> Channel:
        """The handshake on a fresh connection; the socket is closed if it fails."""
        try:
            handshake = ClientHandshake(
                self._identity, server.endpoint.public_key, ticket, ticket_lifetime=self._lifetime
            )
            channel = client_handshake(sock, handshake, deadline, request)
        except BaseException:
            sock.close()
            raise
        server.tickets.store(handshake.new_ticket)
        return channel
