"""bench/wan.py's loopback end: the SOCKS5 client and the destination, in one selector loop.

One thread runs both, so the benchmark's own side adds as little CPU and scheduling as it
can to what it measures: no thread per connection, no GIL hand-offs between a client thread
and a server thread (with 50 connections at once, threads cost about 1 ms of CPU each here).

- ``Destination``: a tiny HTTP server on 127.0.0.1; any GET gets ``RESPONSE``, then a close.
- ``run_fetches(target, count, parallel)``: ``count`` fetches, ``parallel`` at a time. One
  fetch: connect, SOCKS5 no-auth greeting, CONNECT to the name "localhost" (ATYP 3, resolved
  by the proxy), the reply, an HTTP GET, the response to its end (checked byte for byte).
  With ``Target(socks=False)`` the GET goes straight to the port (a bare TCP connection).
  Each fetch records when it started (just before connect), its first response byte and
  its end (time.perf_counter), or what went wrong.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from dataclasses import dataclass

BODY = b"hello from the destination\n" * 4
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\nConnection: close\r\n\r\n"
    + BODY
)
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench/wan.py\r\n\r\n"
NAME = b"localhost"
TIMEOUT = 60.0  # for one run_fetches call


@dataclass(frozen=True)
class Target:
    """Where a fetch connects: a SOCKS5 proxy, or (socks=False) the destination itself."""

    port: int
    dest_port: int
    socks: bool = True


@dataclass
class Result:
    started: float
    first_byte: float | None = None
    ended: float | None = None
    error: str | None = None

    @property
    def ttfb(self) -> float | None:
        return None if self.first_byte is None or self.error else self.first_byte - self.started


class FetchError(Exception):
    """The proxy refused, or the response was wrong."""


class _Fetch:
    """One fetch as a state machine over a non-blocking socket."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.result = Result(time.perf_counter())
        code = self.sock.connect_ex(("127.0.0.1", target.port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, "connect failed")
        self.state = "connecting"
        self.inbox = bytearray()
        self.outbox = b""

    def writable(self) -> None:
        if self.state == "connecting":
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, "connect failed")
            self.state = "greeting" if self.target.socks else "response"
            self.outbox = b"\x05\x01\x00" if self.target.socks else REQUEST
        self._send()

    def _send(self) -> None:
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                return
            self.outbox = self.outbox[sent:]

    def wants_write(self) -> bool:
        return self.state == "connecting" or bool(self.outbox)

    def readable(self) -> bool:
        """Take what arrived; True once the fetch is over."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        now = time.perf_counter()
        self.inbox += data
        while self._step():
            pass
        if self.state == "response" and self.inbox and self.result.first_byte is None:
            self.result.first_byte = now
        if not data:
            if self.state != "response" or bytes(self.inbox) != RESPONSE:
                raise FetchError(f"closed in {self.state} after {bytes(self.inbox[:80])!r}")
            self.result.ended = now
            return True
        return False

    def _step(self) -> bool:
        """Act on a complete message in the inbox; True if one was taken."""
        if self.state == "greeting" and len(self.inbox) >= 2:
            if self.inbox[:2] != b"\x05\x00":
                raise FetchError(f"greeting answered {bytes(self.inbox[:2])!r}")
            del self.inbox[:2]
            port = self.target.dest_port.to_bytes(2, "big")
            self.outbox = b"\x05\x01\x00\x03" + bytes((len(NAME),)) + NAME + port
            self.state = "reply"
            self._send()
            return True
        if self.state == "reply":
            size = _reply_size(self.inbox)
            if size is None or len(self.inbox) < size:
                return False
            del self.inbox[:size]
            self.outbox, self.state = REQUEST, "response"
            self._send()
            return True
        return False


def _reply_size(data: bytearray) -> int | None:
    """The length of the SOCKS5 reply at the start of ``data`` (None: not known yet)."""
    if len(data) < 5:
        return None
    if data[0] != 5 or data[1] != 0:
        raise FetchError(f"SOCKS reply {bytes(data[:4])!r}")
    sizes = {1: 4, 4: 16, 3: 1 + data[4]}
    if data[3] not in sizes:
        raise FetchError(f"SOCKS reply ATYP {data[3]}")
    return 4 + sizes[data[3]] + 2


class _Served:
    """One destination connection: read a request head, answer, close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = b""
        self.outbox: bytes | None = None  # None: the request head is not complete yet


class Destination:
    """The HTTP destination on 127.0.0.1:``port``; it runs inside ``run_fetches``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.served: dict[socket.socket, _Served] = {}

    def accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.served[sock] = _Served(sock)
            selector.register(sock, selectors.EVENT_READ, ("served", sock))

    def ready(self, selector: selectors.BaseSelector, sock: socket.socket, _mask: int) -> None:
        served = self.served[sock]
        try:
            if served.outbox is None:
                data = sock.recv(65536)
                if not data:
                    self._close(selector, sock)
                    return
                served.head += data
                if b"\r\n\r\n" not in served.head:
                    return
                served.outbox = RESPONSE
            served.outbox = served.outbox[sock.send(served.outbox) :]
        except BlockingIOError:
            pass
        except OSError:
            self._close(selector, sock)
            return
        if served.outbox == b"":
            self._close(selector, sock)
        elif served.outbox is not None:
            selector.modify(sock, selectors.EVENT_WRITE, ("served", sock))

    def _close(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        selector.unregister(sock)
        del self.served[sock]
        sock.close()

    def close(self) -> None:
        for sock in list(self.served):
            sock.close()
        self.served.clear()
        self.listener.close()


def run_fetches(
    destination: Destination, target: Target, count: int, parallel: int
) -> list[Result]:
    """``count`` fetches, ``parallel`` at a time; the destination answers meanwhile."""
    selector = selectors.DefaultSelector()
    selector.register(destination.listener, selectors.EVENT_READ, ("listener", None))
    for sock in destination.served:
        selector.register(sock, selectors.EVENT_READ, ("served", sock))
    results: list[Result] = []
    live: dict[socket.socket, _Fetch] = {}
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(results) < count or live:
            while len(live) < parallel and len(results) + len(live) < count:
                _start(selector, target, live, results)
            if time.monotonic() > deadline:
                for fetch in live.values():
                    fetch.result.error = "timeout"
                    results.append(fetch.result)
                break
            for key, mask in selector.select(1.0):
                kind, sock = key.data
                if kind == "listener":
                    destination.accept(selector)
                elif kind == "served":
                    destination.ready(selector, sock, mask)
                else:
                    _progress(selector, live[sock], mask, live, results)
    finally:
        for fetch in live.values():
            fetch.sock.close()
        selector.close()
    return results


def _start(
    selector: selectors.BaseSelector,
    target: Target,
    live: dict[socket.socket, _Fetch],
    results: list[Result],
) -> None:
    try:
        fetch = _Fetch(target)
    except OSError as exc:
        results.append(Result(time.perf_counter(), error=f"connect: {exc}"))
        return
    live[fetch.sock] = fetch
    selector.register(fetch.sock, selectors.EVENT_WRITE, ("fetch", fetch.sock))


def _progress(
    selector: selectors.BaseSelector,
    fetch: _Fetch,
    mask: int,
    live: dict[socket.socket, _Fetch],
    results: list[Result],
) -> None:
    done = False
    try:
        if mask & selectors.EVENT_WRITE:
            fetch.writable()
        if mask & selectors.EVENT_READ:
            done = fetch.readable()
    except (OSError, FetchError) as exc:
        fetch.result.error = f"{type(exc).__name__}: {exc}"
        done = True
    if done:
        selector.unregister(fetch.sock)
        del live[fetch.sock]
        with contextlib.suppress(OSError):
            fetch.sock.close()
        results.append(fetch.result)
        return
    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if fetch.wants_write() else 0)
    if fetch.state == "connecting":
        events = selectors.EVENT_WRITE
    if selector.get_key(fetch.sock).events != events:
        selector.modify(fetch.sock, events, ("fetch", fetch.sock))
