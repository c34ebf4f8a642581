"""What local.py and server.py share: the threaded TCP server, the relay and the object
that closes a connection's sockets (ConnectionSockets).

The relay moves bytes between a plain socket (the SOCKS client on the local, the
destination on the server) and its stream in the encrypted session, one thread per
direction. An EOF on one side becomes the stream's EOF frame (and a TCP half-close) on the other,
and the opposite direction keeps flowing until it ends too. Anything abnormal (a record
that fails authentication, a lost session, a reset, an idle timeout) aborts both
directions, and the plain side gets a TCP reset rather than a clean-looking EOF, so that a
client can never mistake a cut-off transfer for a complete one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from utils.channel import ReadSize, receive, send_all, send_now
from utils.config import Whitelist
from utils.errors import SockproxyError
from utils.events import describe
from utils.mux import MAX_RECORD_DATA
from utils.platform_support import exclusive_bind_option
from utils.ratelimit import LimitedLog
from utils.session import Stream
from utils.stopping import POLL_INTERVAL, Tunnel
from utils.workers import WORKERS

log = logging.getLogger("sockproxy")
access_log = logging.getLogger("sockproxy.access")

LISTEN_BACKLOG = 4096
THREAD_STACK_SIZE = 512 * 1024


def set_nodelay(sock: socket.socket) -> None:
    """Small records go out at once: interactive traffic must not wait for Nagle."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket (tests with socketpair) or already closed


def set_reset_on_close(sock: socket.socket) -> None:
    """From now on, closing ``sock`` (or exiting) resets the connection instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def quietly_shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or never connected: nothing left to wake


def format_peer(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LiveTunnel(Protocol):
    """A relay, a UDP association or the HTTP front, as the access log, a shutdown and
    the connection's sockets see it."""

    to_channel: int
    to_plain: int
    failure: str | None  # None while it runs and after a clean end

    def abort(self, reason: str) -> None: ...


class Relay(Tunnel):
    """Both directions between ``plain`` and a stream until both have ended."""

    def __init__(self, plain: socket.socket, stream: Stream, idle_timeout: float) -> None:
        super().__init__(stream, idle_timeout)
        self.plain = plain

    def serve(self, pending: bytes = b"") -> str | None:
        """Relay until done; return None on a clean end, else the reason it failed."""
        self.plain.setblocking(False)  # utils/channel.py: waits are ours, with stop checks
        self.stream.write_through(self._write_now)
        return self.run(self._pump_down, functools.partial(self._pump_up, pending))

    def _interrupt(self) -> None:
        # Linger 0 now, not at close: if the process exits first (SIGTERM), the kernel
        # must reset, not send a FIN. SHUT_RD wakes a blocked reader where it can.
        set_reset_on_close(self.plain)
        quietly_shutdown(self.plain, socket.SHUT_RD)

    def _pump_up(self, pending: bytes) -> None:
        """Plain socket -> stream, then the stream's EOF."""
        if pending:
            self.stream.send(pending, self.idle_timeout)
            self.to_channel += len(pending)
        read_size = ReadSize(MAX_RECORD_DATA)
        while data := self.wait(lambda: self._read_plain(read_size.size)):
            self.touch()
            read_size.update(len(data))
            self.stream.send(data, self.idle_timeout)
            self.to_channel += len(data)
        self.check_stopping()
        self.stream.send_end()

    def _write_now(self, data: bytes) -> int:
        """For the session's reader: what the plain socket takes at once (never waits)."""
        written = send_now(self.plain, data)
        if written:
            self.to_plain += written
            self.touch()
        return written

    def _read_plain(self, size: int) -> bytes:
        data = receive(self.plain, size, POLL_INTERVAL, self._stopping)
        if data is None:
            raise TimeoutError("nothing to read yet")
        return data

    def _pump_down(self) -> None:
        """Stream -> plain socket, then a half-close towards the plain side."""
        while chunks := self.wait(lambda: self.stream.receive(POLL_INTERVAL)):
            self.touch()
            for chunk in chunks:
                send_all(self.plain, chunk, self.idle_timeout, self._stopping, self.touch)
                self.to_plain += len(chunk)
                self.stream.consumed(len(chunk))
        self.check_stopping()
        self.plain.shutdown(socket.SHUT_WR)


@dataclass
class AccessRecord:
    """One line of the access log: who, where to, how much, how long, how it ended.

    ``up`` is towards the destination, ``down`` towards the client, on both programs.
    """

    client: str
    target: str = "-"
    identity: str = ""
    outcome: str = "ok"
    started: float = field(default_factory=time.monotonic)
    relay: LiveTunnel | None = None
    plain_is_client: bool = True

    @property
    def up(self) -> int:
        if self.relay is None:
            return 0
        return self.relay.to_channel if self.plain_is_client else self.relay.to_plain

    @property
    def down(self) -> int:
        if self.relay is None:
            return 0
        return self.relay.to_plain if self.plain_is_client else self.relay.to_channel

    def line(self) -> str:
        who = f"{self.client} ({self.identity})" if self.identity else self.client
        seconds = time.monotonic() - self.started
        return (
            f"{who} -> {self.target} up={self.up} down={self.down} "
            f"time={seconds:.3f}s outcome={self.outcome}"
        )


class ConnectionSockets:
    """What one client connection has opened, closed in one place on every path.

    Whoever opens a socket for the connection registers it here at once: the plain TCP
    side (the client on the local, the destination on the server), the stream in the
    session, a UDP socket. The end of the ``with`` block (a clean end, a refusal, an
    error) closes each of them once, as the end calls for: when the connection's tunnel
    (``record.relay``) was aborted, the access line says so and the plain side gets a TCP
    reset, so that a client never takes a cut-off transfer for a complete one; a stream
    is RESET when the tunnel was aborted or an exception ended the connection, so that the
    peer lets go of its end too. Everything else closes cleanly.
    """

    def __init__(self, record: AccessRecord) -> None:
        self.record = record
        self._plain: list[socket.socket] = []
        self._udp: list[socket.socket] = []
        self._streams: list[Stream] = []
        self._promised = False

    def promised(self) -> None:
        """The client was told that the connection succeeded (fast open): from now on an
        error that ends it resets the plain side, as an aborted relay does."""
        self._promised = True

    def plain(self, sock: socket.socket) -> socket.socket:
        self._plain.append(sock)
        return sock

    def udp(self, sock: socket.socket) -> socket.socket:
        self._udp.append(sock)
        return sock

    def stream(self, stream: Stream) -> Stream:
        self._streams.append(stream)
        return stream

    def __enter__(self) -> ConnectionSockets:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        self.close(exc)

    def close(self, error: BaseException | None = None) -> None:
        """Close everything registered (once: a second call finds nothing left)."""
        tunnel = self.record.relay
        failure = None if tunnel is None else tunnel.failure
        if failure is not None:
            self.record.outcome = f"aborted: {failure}"
        self._end_streams(failure or (None if error is None else describe(error)))
        self._close_sockets(reset=failure is not None or (self._promised and error is not None))

    def _end_streams(self, reset: str | None) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            if reset is not None:
                stream.abort(reset)
            stream.close()

    def _close_sockets(self, reset: bool) -> None:
        plain, self._plain = self._plain, []
        for sock in plain:
            if reset:
                set_reset_on_close(sock)
            else:  # as socketserver does: the FIN before a reset for bytes left unread
                quietly_shutdown(sock, socket.SHUT_WR)
            _close(sock)
        udp, self._udp = self._udp, []
        for sock in udp:
            _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # an error of one close must not keep the others open
        sock.close()


class TunnelHandler(socketserver.BaseRequestHandler):
    """The common handler: subclasses set up one tunnel in ``serve``, then call ``relay``.

    ``sockets`` holds what the connection opens, the client's socket first.
    """

    server: ProxyServer
    sockets: ConnectionSockets
    idle_timeout: float = 300.0
    plain_is_client = True  # the local relays for the client; the server for the destination

    def handle(self) -> None:
        set_nodelay(self.request)
        record = AccessRecord(
            format_peer(self.client_address), plain_is_client=self.plain_is_client
        )
        try:
            with self.server.tracking(record), ConnectionSockets(record) as self.sockets:
                self.sockets.plain(self.request)
                self.serve(record)
        except (OSError, SockproxyError) as exc:
            record.outcome = describe(exc)
        finally:
            log_access(record)

    def serve(self, record: AccessRecord) -> None:
        raise NotImplementedError

    def relay(
        self, plain: socket.socket, stream: Stream, record: AccessRecord, pending: bytes = b""
    ) -> None:
        run_relay(record, plain, stream, self.idle_timeout, pending)


def run_relay(
    record: AccessRecord,
    plain: socket.socket,
    stream: Stream,
    idle_timeout: float,
    pending: bytes = b"",
) -> None:
    """Relay until both directions end; the connection's ``ConnectionSockets`` closes both."""
    relay = Relay(plain, stream, idle_timeout)
    record.relay = relay
    relay.serve(pending)


def log_access(record: AccessRecord) -> None:
    """The connection's access line: never rate-limited, never dropped."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("%s", record.line())


class ProxyServer(socketserver.ThreadingTCPServer):
    """ThreadingTCPServer with a whitelist, a connection limit and a real backlog."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
        whitelist: Whitelist,
        max_connections: int,
    ) -> None:
        self.address_family = _family_of(address[0])
        self.whitelist = whitelist
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._live: dict[int, AccessRecord] = {}
        self._live_lock = threading.Lock()
        self.limited_log = LimitedLog(log)  # lines a stranger can pace: limited per source
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # POSIX SO_REUSEADDR only allows a restart over TIME_WAIT; on Windows it would let
        # another program bind our port too, so SO_EXCLUSIVEADDRUSE replaces it there.
        exclusive = exclusive_bind_option()
        if exclusive is not None:
            self.allow_reuse_address = False
            self.socket.setsockopt(socket.SOL_SOCKET, exclusive, 1)
        if self.address_family == socket.AF_INET6:
            # "::" then takes IPv4 clients too (as ::ffff:a.b.c.d; the whitelist unmaps them).
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse before reading a byte: strangers first, then a full house."""
        if not self.whitelist.allows(client_address[0]):
            self.limited_log.warning(
                client_address[0], "refused %s: not on the whitelist", format_peer(client_address)
            )
            return False
        if not self._slots.acquire(blocking=False):
            self.limited_log.warning(
                client_address[0],
                "refused %s: max_connections (%d) reached",
                format_peer(client_address),
                self.max_connections,
            )
            return False
        return True

    def service_actions(self) -> None:
        """Each turn of the accept loop (every 0.5 s at most): due "suppressed" summaries."""
        self.limited_log.flush()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve each connection on a pooled worker thread (ThreadingMixIn starts a new one)."""
        try:
            WORKERS.submit(self.process_request_thread, request, client_address)
        except RuntimeError:  # no thread could be started: shed this one connection
            log.error("refused %s: cannot start a thread", format_peer(client_address))
            self._slots.release()
            self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        """socketserver's, but not for a socket the handler has closed already (a failed
        shutdown() and its exception on every connection)."""
        if request.fileno() != -1:
            super().shutdown_request(request)

    def tracking(self, record: AccessRecord) -> _Tracking:
        """Keep ``record`` in the live table while its connection is served (a with block)."""
        return _Tracking(self._live, self._live_lock, record)

    def abort_all(self, reason: str, grace: float = 3.0) -> None:
        """Abort every live tunnel (their clients get a reset, not a clean-looking EOF) and
        wait up to ``grace`` seconds for the handlers to close their sockets."""
        with self._live_lock:
            records = list(self._live.values())
        for record in records:
            if record.relay is not None:
                record.relay.abort(reason)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._live_lock:
                if not any(r.relay is not None for r in self._live.values()):
                    return
            time.sleep(0.02)

    def summary(self) -> list[str]:
        """One line per live connection, then a total (for SIGUSR1)."""
        with self._live_lock:
            records = list(self._live.values())
        lines = [f"live: {record.line()}" for record in records]
        up, down = sum(r.up for r in records), sum(r.down for r in records)
        lines.append(f"{len(records)} live connection(s), up={up} down={down} bytes")
        return lines

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error with %s", format_peer(client_address))


class _Tracking:
    """``ProxyServer.tracking``: a class, not a generator, as it runs for every connection."""

    def __init__(
        self, live: dict[int, AccessRecord], lock: threading.Lock, record: AccessRecord
    ) -> None:
        self._live = live
        self._lock = lock
        self._record = record

    def __enter__(self) -> None:
        with self._lock:
            self._live[id(self._record)] = self._record

    def __exit__(self, *_exc_info: object) -> None:
        with self._lock:
            del self._live[id(self._record)]


def _family_of(host: str) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]
