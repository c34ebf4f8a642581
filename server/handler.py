"""server.py's side: accept a session, stay silent unless it authenticates, then serve
each stream: connect to its destination and relay."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

from server.destinations import Destinations
from server.limits import TunnelLimits
from server.replay import ReplayFilter
from server.udp import ExitAssociation, open_udp_socket
from utils.base import (
    AccessRecord,
    ConnectionSockets,
    ProxyServer,
    format_peer,
    log_access,
    run_relay,
    set_nodelay,
)
from utils.channel import Deadline, recv_some
from utils.config import AuthorizedKey, ServerConfig
from utils.crypto import rsa_sign
from utils.errors import SockproxyError
from utils.events import describe
from utils.handshake import (
    AuthorizedPeer,
    ClientInit,
    NotForThisServer,
    ServerHandshake,
    UnknownKey,
    server_secret,
)
from utils.keys import fingerprint_text
from utils.session import Session, Stream
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
from utils.workers import WORKERS

log = logging.getLogger("sockproxy.server")

NO_ADDRESS = Address("0.0.0.0", 0)


SESSION_TIMEOUT = 60.0  # a session with no byte for this long is dead (locals ping every 10 s)


def _why(exc: BaseException) -> str:
    """What the server's log says of a failed handshake (the peer is told nothing)."""
    if isinstance(exc, ConnectionError):
        return "closed before a whole ClientInit"
    if isinstance(exc, TimeoutError):
        return "no whole ClientInit in time"
    if isinstance(exc, NotForThisServer):
        return (
            "not a ClientInit sealed to this server's key (a probe, garbage, or a local "
            "whose server_public_key is another server's)"
        )
    if isinstance(exc, UnknownKey):
        return (
            f"unknown local key {fingerprint_text(exc.fingerprint)}: add its public key file "
            f'to "authorized_keys" (or "local_public_key") in the server config to let it in'
        )
    return describe(exc)


def _stay_silent(sock: socket.socket, deadline: Deadline) -> None:
    """Read and discard until the handshake deadline, then let the caller close: the
    peer sees the same silence and the same moment of closing whatever it sent (an EOF
    or an error does not close the connection earlier)."""
    try:
        while True:
            sock.settimeout(deadline.remaining())
            if not sock.recv(65536):
                break
    except OSError:  # TimeoutError (the deadline) included
        pass
    try:
        time.sleep(deadline.remaining())
    except TimeoutError:
        pass


class _Counter:
    """A thread-safe count, for the SIGUSR1 summary and the tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        with self._lock:
            self.value += 1


class ExitServer(ProxyServer):
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.private_key_operations = _Counter()
        self.secret = server_secret(config.private_key, self._sign)
        self.replay = ReplayFilter()
        self.destinations = Destinations(config)
        self.limits = TunnelLimits(
            config.max_connections_per_key, config.max_udp_associations_per_key
        )
        self.authorized: dict[bytes, AuthorizedPeer] = {}
        self.stream_slots = threading.BoundedSemaphore(config.max_connections)
        self._sessions: dict[int, tuple[Session, bytes]] = {}
        self._sessions_lock = threading.Lock()
        self.set_authorized_keys(config.authorized_keys)
        super().__init__(
            (config.address, config.port), ExitHandler, config.whitelist, config.max_connections
        )

    def _sign(self, message: bytes) -> bytes:
        self.private_key_operations.add()
        return rsa_sign(self.config.private_key, message)

    def summary(self) -> list[str]:
        lines = super().summary()
        with self._sessions_lock:
            lines.append(f"{len(self._sessions)} session(s) from locals")
        lines.append(f"rsa private-key operations so far: {self.private_key_operations.value}")
        return lines

    def set_authorized_keys(self, keys: tuple[AuthorizedKey, ...]) -> None:
        """Swap in a new key list; sessions of keys that are gone end at once."""
        table = {key.fingerprint: AuthorizedPeer(key.name, key.key) for key in keys}
        self.authorized = table  # one assignment: handshakes see the old or the new table
        with self._sessions_lock:
            revoked = [s for s, fp in self._sessions.values() if fp not in table]
        for session in revoked:
            session.close("its key is no longer authorized")

    @contextlib.contextmanager
    def session_tracking(self, session: Session, fingerprint: bytes) -> Iterator[None]:
        with self._sessions_lock:
            self._sessions[id(session)] = (session, fingerprint)
        try:
            yield
        finally:
            with self._sessions_lock:
                del self._sessions[id(session)]

    def abort_all(self, reason: str, grace: float = 3.0) -> None:
        """Reset every live stream, then end each session cleanly (its end-of-stream
        record), so that a local tells a stop from a cut."""
        super().abort_all(reason, grace)
        with self._sessions_lock:
            sessions = [session for session, _ in self._sessions.values()]
        for session in sessions:
            session.end()


class ExitHandler(socketserver.BaseRequestHandler):
    """One session from a local: the handshake, then a stream per client connection."""

    server: ExitServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        set_nodelay(sock)
        self.peer = format_peer(self.client_address)
        deadline = Deadline(self.server.config.timeouts.handshake)
        try:
            handshake, init = self._authenticate(sock, deadline)
        except (OSError, SockproxyError) as exc:
            # Silent towards the peer, explicit in our log.
            self.server.limited_log.warning(
                self.client_address[0], "handshake from %s failed: %s", self.peer, _why(exc)
            )
            _stay_silent(sock, deadline)
            return
        self._run_session(sock, handshake, init)

    def _authenticate(
        self, sock: socket.socket, deadline: Deadline
    ) -> tuple[ServerHandshake, ClientInit]:
        handshake = ServerHandshake(self.server.secret, self.server.authorized)
        init = None
        while init is None:
            init = handshake.consume_client_init(
                recv_some(sock, deadline, max(handshake.bytes_wanted(), 1))
            )
        self.server.replay.check(init.random, init.timestamp_ms)
        return handshake, init

    def _run_session(
        self, sock: socket.socket, handshake: ServerHandshake, init: ClientInit
    ) -> None:
        defer = bool(init.early) and self.server.replay.must_defer(init.timestamp_ms)
        response = handshake.create_server_response(defer_early=defer)
        assert handshake.keys is not None
        self.identity = init.peer.name
        sock.settimeout(SESSION_TIMEOUT)
        sock.sendall(response)
        session = Session(sock, handshake.keys, SESSION_TIMEOUT)
        log.info("session from %s (%s) opened", self.peer, self.identity)
        with self.server.session_tracking(session, init.fingerprint):
            try:
                if defer:
                    session.defer_early(init.early)
                else:
                    session.feed_early(init.early, self._on_open)
                session.accept_pending(handshake.trailing_data(), self._on_open)
            except (OSError, SockproxyError) as exc:  # early frames that do not parse
                reason: str | None = describe(exc)
                session.close(reason or "early data refused")
            else:
                reason = session.read_loop(self._on_open)
        log.info("session from %s (%s) ended: %s", self.peer, self.identity, reason or "closed")
        session.end()

    def _on_open(self, stream: Stream, request: bytes) -> None:
        WORKERS.submit(self._serve_stream, stream, request)

    def _serve_stream(self, stream: Stream, message: bytes) -> None:
        record = AccessRecord(self.peer, identity=self.identity, plain_is_client=False)
        slot = self.server.stream_slots.acquire(blocking=False)
        try:
            with self.server.tracking(record), ConnectionSockets(record) as sockets:
                sockets.stream(stream)
                if not slot:
                    log.warning("refused a stream from %s: max_connections reached", self.peer)
                    record.outcome = "max_connections reached"
                    stream.reply(encode_tunnel_reply(Reply.GENERAL_FAILURE, NO_ADDRESS))
                    return
                self._serve_request(sockets, stream, decode_tunnel_request(message))
        except (OSError, SockproxyError) as exc:
            record.outcome = describe(exc)
        finally:
            if slot:
                self.server.stream_slots.release()
            log_access(record)

    def _serve_request(self, sockets: ConnectionSockets, stream: Stream, request: Request) -> None:
        record = sockets.record
        record.target = str(request.address)
        udp = request.command == CMD_UDP_ASSOCIATE
        refused = self.server.limits.admit(self.identity, udp)
        if refused is not None:
            log.warning("refused a tunnel of key %s: %s reached", self.identity, refused)
            record.outcome = f"{refused} reached"
            stream.reply(encode_tunnel_reply(Reply.GENERAL_FAILURE, NO_ADDRESS))
            return
        try:
            self._serve_admitted(sockets, stream, request, udp)
        finally:
            self.server.limits.release(self.identity, udp)

    def _serve_admitted(
        self, sockets: ConnectionSockets, stream: Stream, request: Request, udp: bool
    ) -> None:
        if udp:
            self._associate(sockets, stream)
            return
        target, reply = self._connect(request)
        if target is None:
            sockets.record.outcome = reply.name.lower()
            stream.reply(encode_tunnel_reply(reply, NO_ADDRESS))
            return
        sockets.plain(target)
        set_nodelay(target)
        host, port = target.getsockname()[:2]
        stream.reply(encode_tunnel_reply(Reply.SUCCEEDED, Address(host, port)))
        run_relay(sockets.record, target, stream, self.server.config.timeouts.idle)

    def _associate(self, sockets: ConnectionSockets, stream: Stream) -> None:
        udp_socket = open_udp_socket(sockets)  # before the reply: it may fail
        association = ExitAssociation(stream, self.server.destinations, udp_socket)
        stream.reply(encode_tunnel_reply(Reply.SUCCEEDED, NO_ADDRESS))
        sockets.record.relay = association
        association.serve()

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
