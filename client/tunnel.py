"""The local's sessions to its server(s): one session carries every connection.

Like ``ssh -D``, the local keeps one authenticated, keyed session to its server and opens
a stream in it for each client connection: one round trip to the server instead of a TCP
and a cryptographic handshake each time. Without a session (the first connection, or
after a loss) the request rides in the ClientInit, so even a cold start costs one round
trip more than the TCP handshake. Servers are tried in order with failover and a back-off;
a keepalive notices a dead or half-open server.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from utils.base import set_nodelay
from utils.channel import Deadline, recv_some
from utils.config import LocalConfig, ServerEndpoint
from utils.crypto import RsaKey
from utils.errors import SockproxyError
from utils.events import describe
from utils.handshake import ClientHandshake, ServerPublic, SessionKeys
from utils.keys import fingerprint
from utils.mux import opening_frames
from utils.session import Session, Stream, StreamReset
from utils.socks5 import Address, Reply, Request, decode_tunnel_reply, encode_tunnel_request
from utils.workers import WORKERS

log = logging.getLogger("sockproxy.tunnel")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
KEEPALIVE_INTERVAL = 10.0  # ping a session that has been silent this long
KEEPALIVE_TIMEOUT = 10.0  # and give it up when the ping stays unanswered this long
SEND_TIMEOUT = 60.0  # a session whose socket takes no byte for this long is dead
NO_ADDRESS = Address("0.0.0.0", 0)


class TunnelUnavailable(SockproxyError):
    """No server could be reached or would complete a handshake."""


@dataclass
class ServerState:
    """One configured server and its failure back-off."""

    endpoint: ServerEndpoint
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


class LocalSession:
    """A session to one server, as the local uses it: stream ids, age, its reader."""

    def __init__(self, server: ServerState, session: Session, lifetime: float) -> None:
        self.server = server
        self.session = session
        self._lifetime = lifetime
        self._lock = threading.Lock()
        self._next_id = 1

    def usable(self) -> bool:
        session = self.session
        young = time.monotonic() - session.started < self._lifetime
        return session.closed is None and not session.draining and young

    def open_stream(self, request: bytes, early: bytes) -> Stream:
        """Send OPEN (and any early data) for a new stream."""
        with self._lock:  # ids must reach the server in increasing order
            stream = self.session.add(self._take_id())
            stream.sent_early(len(early))
            self.session.send(opening_frames(stream.id, request, early))
        return stream

    def _take_id(self) -> int:
        stream_id = self._next_id
        self._next_id += 1
        return stream_id

    def first_stream(self, early: bytes) -> Stream:
        """Stream 1, whose OPEN rode in the ClientInit."""
        with self._lock:
            stream = self.session.add(self._take_id())
        stream.sent_early(len(early))
        return stream

    def run_reader(self, trailing: bytes) -> None:
        session = self.session
        try:
            session.accept_pending(trailing, None)
            reason = session.read_loop()
        except (OSError, SockproxyError) as exc:
            reason = describe(exc)
            session.close(reason)
        if reason is not None:
            log.warning("session to %s ended: %s", self.server.name, reason)
        session.sock.close()

    def keepalive(self, now: float) -> None:
        """Ping when silent; give up when a ping stays unanswered; retire when old and idle."""
        session = self.session
        if session.closed is not None:
            return
        if session.ping_sent_at is not None:
            if now - session.ping_sent_at > KEEPALIVE_TIMEOUT:
                session.close("keepalive timeout: the server does not answer")
        elif now - session.last_received > KEEPALIVE_INTERVAL:
            session.ping()
        if not self.usable() and session.stream_count == 0:
            session.end()


class Connector:
    """Opens a stream for each request on the current session, making one when needed."""

    def __init__(self, config: LocalConfig) -> None:
        self._identity: RsaKey = config.private_key
        self._connect_timeout = config.timeouts.connect
        self._lifetime = config.resumption_lifetime
        self.servers = [ServerState(endpoint) for endpoint in config.servers]
        self._sessions: list[LocalSession] = []
        self._lock = threading.Lock()
        self._establishing = threading.Lock()  # one handshake at a time: a burst shares it
        self._keepalive_started = False

    def open(
        self, request: Request, deadline: Deadline, early: bytes = b"", wait: bool = True
    ) -> tuple[Stream, Reply, Address]:
        """A stream for ``request`` with the server's reply (``wait``), or at once with
        ``early`` data sent behind the request (fast open: a failure shows up later as a
        reset of the stream)."""
        message = encode_tunnel_request(request)
        for attempt in (1, 2):
            stream = self._open_stream(message, early, deadline)
            if not wait:
                stream.watch_reply(functools.partial(_check_late_reply, stream))
                return stream, Reply.SUCCEEDED, NO_ADDRESS
            try:
                return (stream, *self._answer(stream, deadline))
            except StreamReset:
                # Nothing but the request went out, so asking again cannot send data twice.
                if attempt == 2 or early:
                    raise
                log.info("session lost before the reply; asking again on a fresh session")
            except BaseException:
                # No reply in time: the session must not keep the stream (nor the server
                # its destination connection) for a client that is gone.
                stream.abort("no reply in time")
                stream.close()
                raise
        raise AssertionError("unreachable")

    def _open_stream(self, message: bytes, early: bytes, deadline: Deadline) -> Stream:
        live = self._live()
        if live is not None:
            try:
                return live.open_stream(message, early)
            except StreamReset:
                pass  # it died just now: make a new one
        if not self._establishing.acquire(timeout=deadline.remaining()):
            raise TimeoutError("waiting for another connection's handshake")
        try:
            live = self._live()  # another connection may have made one meanwhile
            if live is not None:
                return live.open_stream(message, early)
            return self._establish(message, early, deadline)
        finally:
            self._establishing.release()

    def _live(self) -> LocalSession | None:
        with self._lock:
            self._sessions = [s for s in self._sessions if s.session.closed is None]
            for live in reversed(self._sessions):
                if live.usable():
                    return live
        return None

    @staticmethod
    def _answer(stream: Stream, deadline: Deadline) -> tuple[Reply, Address]:
        reply, bind = decode_tunnel_reply(stream.wait_reply(deadline.remaining()))
        if reply != Reply.SUCCEEDED:
            stream.close()  # the server has forgotten it already
        return reply, bind

    # -- making a session
    def _establish(self, message: bytes, early: bytes, deadline: Deadline) -> Stream:
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
                sock = self._connect(server.endpoint, share)
            except OSError as exc:
                server.failed()
                log.warning("server %s failed: %s", server.name, describe(exc))
                last_error = exc
                continue
            try:
                return self._handshake(server, sock, message, early, share)
            except (OSError, SockproxyError) as exc:
                sock.close()
                server.failed()
                self._explain(server, exc)
                last_error = exc
                if early:
                    break  # the data may have reached the server: never send it twice
        raise TunnelUnavailable(f"no server available ({describe(last_error or TimeoutError())})")

    def _explain(self, server: ServerState, exc: BaseException) -> None:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.warning(
                "server %s closed the handshake without answering (%s). Likely causes: the "
                "server does not list this local's key %s in authorized_keys (or "
                "local_public_key); server_public_key is not that server's key; or this "
                "computer's clock is off by more than a minute",
                server.name,
                describe(exc),
                fingerprint(self._identity),
            )
        else:
            log.warning("server %s failed its handshake: %s", server.name, describe(exc))

    def _in_order(self) -> list[ServerState]:
        """Servers not in back-off first, in config order; then the rest as a last resort."""
        now = time.monotonic()
        ready = [s for s in self.servers if s.available(now)]
        return ready + [s for s in self.servers if not s.available(now)]

    def _connect(self, endpoint: ServerEndpoint, deadline: Deadline) -> socket.socket:
        timeout = min(self._connect_timeout, deadline.remaining())
        sock = socket.create_connection((endpoint.address, endpoint.port), timeout=timeout)
        set_nodelay(sock)
        return sock

    def _handshake(
        self,
        server: ServerState,
        sock: socket.socket,
        message: bytes,
        early: bytes,
        deadline: Deadline,
    ) -> Stream:
        endpoint = server.endpoint
        handshake = ClientHandshake(
            self._identity, ServerPublic(endpoint.public_key, endpoint.static_share)
        )
        first = opening_frames(1, message, early)
        deadline.arm(sock)
        sock.sendall(handshake.create_client_init(first))
        keys: SessionKeys | None = None
        while keys is None:
            keys = handshake.consume_server_response(recv_some(sock, deadline, 16 * 1024))
        live = LocalSession(server, Session(sock, keys, SEND_TIMEOUT), self._lifetime)
        stream = live.first_stream(early)
        WORKERS.submit(live.run_reader, handshake.trailing_data())
        if handshake.early_deferred:  # the server waits for a record under the new keys
            live.session.ping()
        server.succeeded()
        with self._lock:
            self._sessions.append(live)
        self._start_keepalive()
        return stream

    # -- keepalive
    def _start_keepalive(self) -> None:
        with self._lock:
            if self._keepalive_started:
                return
            self._keepalive_started = True
        threading.Thread(target=self._keepalive_loop, name="keepalive", daemon=True).start()

    def _keepalive_loop(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                sessions = list(self._sessions)
            now = time.monotonic()
            for live in sessions:
                live.keepalive(now)

    def end_all(self) -> None:
        """On stop, after the streams were reset: end every session cleanly."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for live in sessions:
            live.session.end()


def _check_late_reply(stream: Stream, body: bytes) -> None:
    """Fast open: the client was told "succeeded" already; a refusal becomes a reset."""
    try:
        reply, _ = decode_tunnel_reply(body)
    except SockproxyError:
        stream.lost("unreadable reply from the server")
        return
    if reply != Reply.SUCCEEDED:
        stream.lost(f"destination: {reply.name.lower()}")
