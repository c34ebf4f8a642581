"""Helpers of the attack tests (tests/test_attacks.py): a tampering relay, transfers, probes.

The relay sits between a real local.py and a real server.py (the local's ``server_port``
points at it) and cuts each direction's byte stream into *units*: the handshake message,
then records. Protocol v2 (docs/PROTOCOL.md) puts no length in the clear, so the relay is
given the one secret a wiretapper lacks: the server's static X25519 key (the tests hold the
server's key files). With it, and only for cutting, it opens the ClientInit's sealed header
(its length) and body (where the early data lies) and the ServerResponse's sealed length
header. It never has the session keys (they need an ephemeral key), so records stay opaque:
it predicts their sizes from the traffic the tests make (``Layout``): a record of one frame
of at most 50 bytes (PING, PONG, OPEN, REPLY, WINDOW, EOF, RESET) is one cell, 98 bytes on
the wire; a paced 1000-byte write is one DATA frame in one record of 18 + 21 * 64 + 16
bytes; the end-of-stream record of a session is a sealed count of 0, 18 bytes.

One unit of one direction is then flipped, dropped, duplicated, swapped with the next unit,
or the stream is cut half-way through it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from tests.conftest import Program, TCPServer, read_to_end, recv_parsed, socks_handshake, wait_for
from utils import handshake as hs
from utils.cells import CELL_SIZE, MAX_CELL_PAYLOAD, SEALED_COUNT_SIZE
from utils.crypto import TAG_SIZE, Ephemeral, RsaKey, static_x25519
from utils.errors import SockproxyError
from utils.keys import fingerprint_bytes, load_private_key, load_server_public_key
from utils.mux import HEADER_SIZE as FRAME_HEADER_SIZE
from utils.mux import STREAM_WINDOW, open_frame
from utils.socks5 import (
    CMD_CONNECT,
    Address,
    Request,
    build_request,
    encode_tunnel_request,
    parse_reply,
)

L2S = "l2s"  # local -> server
S2L = "s2l"  # server -> local
ACTIONS = ("flip", "drop", "duplicate", "reorder", "truncate")


def record_size(payload: int) -> int:
    """Wire size of one record carrying ``payload`` bytes of frames."""
    cells = -(-payload // MAX_CELL_PAYLOAD)
    return SEALED_COUNT_SIZE + cells * CELL_SIZE + TAG_SIZE


CONTROL_RECORD_SIZE = record_size(FRAME_HEADER_SIZE + 8)  # one small frame: 98 bytes
END_RECORD_SIZE = SEALED_COUNT_SIZE  # the session's end-of-stream record: 18 bytes
CHUNK = 1000  # bytes per paced write of the paced transfers
CHUNKS = 20
PACE = 0.01  # seconds between paced writes: each write becomes its own record
DATA_RECORD_SIZE = record_size(FRAME_HEADER_SIZE + CHUNK)  # 1378 bytes

# The transfers: fixed pseudo-random bytes, so a wrong byte anywhere shows.
DOWNLOAD = random.Random(b"sockproxy download").randbytes(CHUNK * CHUNKS)
UPLOAD = random.Random(b"sockproxy upload").randbytes(CHUNK * CHUNKS)
# Past the stream's flow-control window (utils/mux.py), so the receiver must send WINDOW
# frames (one per half window it hands on) before the sender may finish.
BIG = STREAM_WINDOW * 3 // 2
BIG_DOWNLOAD = random.Random(b"sockproxy big download").randbytes(BIG)
BIG_UPLOAD = random.Random(b"sockproxy big upload").randbytes(BIG)

RELAY_POLL = 0.2  # relay sockets wake this often to look at their stop flag
RELAY_IDLE_LIMIT = 30.0  # a relayed connection silent this long is cut
TRANSFER_TIMEOUT = 15.0  # socket timeout of the in-test client and destination


# --------------------------------------------------------------------------- cutting the wire


class Observer:
    """Cuts the handshake into its messages with the server's static X25519 key.

    Uses the handshake's own key schedule (utils.handshake ``_init_keys``): the test
    needs the sizes the server computes, by the same rules.
    """

    def __init__(self, static: Ephemeral) -> None:
        self._static = static
        self._keys: dict[bytes, Any] = {}

    @classmethod
    def from_key_file(cls, server_private: Path) -> Observer:
        return cls(static_x25519(load_private_key(server_private)))

    def _init_keys(self, head: bytes) -> Any:
        if head not in self._keys:
            random_, masked = head[: hs.RANDOM_SIZE], head[hs.RANDOM_SIZE : hs.INIT_PREFIX_SIZE]
            share = hs._xor(masked, hs.mask_for(self._static.share, random_))
            es = self._static.agree(share)
            self._keys[head] = hs._init_keys(es, self._static.share, random_, share)
        return self._keys[head]

    def init_size(self, stream: bytes) -> int | None:
        """Wire size of the ClientInit that ``stream`` starts with (None: need more bytes)."""
        if len(stream) < hs.INIT_HEAD_SIZE:
            return None
        head = stream[: hs.INIT_HEAD_SIZE]
        keys = self._init_keys(head)
        sealed = head[hs.INIT_PREFIX_SIZE :]
        try:
            plain = keys.init.open(hs.HEADER_NONCE, sealed, head[: hs.INIT_PREFIX_SIZE])
        except SockproxyError:
            raise ValueError(
                "the local's first bytes are not a ClientInit to this server"
            ) from None
        return hs.INIT_HEAD_SIZE + hs.InitHeader.decode(plain).body_length

    def early_region(self, stream: bytes) -> tuple[int, int] | None:
        """(offset, length) of the early data (its ciphertext) inside the ClientInit."""
        size = self.init_size(stream)
        if size is None or len(stream) < size:
            return None
        keys = self._init_keys(stream[: hs.INIT_HEAD_SIZE])
        body = hs.InitBody.decode(keys.init.open(hs.BODY_NONCE, stream[hs.INIT_HEAD_SIZE : size]))
        offset = hs.INIT_HEAD_SIZE + hs.FINGERPRINT_SIZE + 2 + len(body.signature) + 2
        return offset, len(body.early)

    def response_size(self, init_head: bytes, stream: bytes) -> int | None:
        """Wire size of the ServerResponse that ``stream`` starts with."""
        if len(init_head) < hs.INIT_HEAD_SIZE or len(stream) < hs.RESPONSE_HEAD_SIZE:
            return None
        keys = self._init_keys(init_head[: hs.INIT_HEAD_SIZE])
        plain = keys.response.open(hs.HEADER_NONCE, stream[: hs.RESPONSE_HEAD_SIZE])
        return hs.RESPONSE_HEAD_SIZE + int.from_bytes(plain, "big")


@dataclass(frozen=True)
class Layout:
    """The units of one direction, as the relay predicts them.

    ``opening``: "init" (the ClientInit), "init-split" (the ClientInit cut in three: before
    its early data, the early data, the rest), "response" (the ServerResponse) or "" (none:
    a warm session, counted from the moment the plan was armed). Then ``records`` (sizes in
    order), then records of size ``then`` (0: unknown).
    """

    opening: str
    records: tuple[int, ...]
    then: int = 0


SizeOf = Callable[[int, bytes], int | None]  # (unit index, the stream so far) -> size


def unit_sizes(layout: Layout, observer: Observer | None, init_head: Callable[[], bytes]) -> SizeOf:
    """The size function of ``layout`` for one link."""

    def opening(stream: bytes) -> list[int] | None:
        if not layout.opening:
            return []
        assert observer is not None
        if layout.opening == "response":
            size = observer.response_size(init_head(), stream)
            return None if size is None else [size]
        if layout.opening == "init":
            size = observer.init_size(stream)
            return None if size is None else [size]
        size, region = observer.init_size(stream), observer.early_region(stream)
        if size is None or region is None:
            return None
        offset, length = region
        return [offset, length, size - offset - length]

    def size_of(index: int, stream: bytes) -> int | None:
        units = opening(stream)
        if units is None:
            return None
        if index < len(units):
            return units[index]
        index -= len(units)
        if index < len(layout.records):
            return layout.records[index]
        return layout.then or None

    return size_of


QUIET = 0.25  # seconds without a byte after which a held tail is taken for the stream's last


@dataclass(frozen=True)
class Tamper:
    """One action on one unit of ``direction`` (a flip picks its bit from ``seed``).

    ``tail`` "" targets unit number ``unit``. The ends of a stream cannot be counted (a
    busy local may put two paced writes in one record), so they are found from the end,
    holding back the tail of the stream from unit ``unit`` (the first data record) on:

    * "eof-at-fin": the last record before the session's end record, acted on at the
      sender's FIN (the local's EOF frame: its session ends right after its streams);
    * "end-at-fin": the session's end-of-stream record (the last 18 bytes before the FIN;
      a reorder swaps it with the 18 bytes before it);
    * "eof-at-quiet": the last 98-byte record before the stream falls silent for QUIET s
      (the server's EOF frame: its session ends only after the local's);
    * "end-after-peer-fin": whatever comes after the other direction's FIN (the server's
      end-of-stream record: it answers the local's).
    """

    direction: str
    unit: int
    action: str
    seed: int = 0
    tail: str = ""


_HOLD = {"eof-at-fin": CONTROL_RECORD_SIZE + END_RECORD_SIZE, "end-at-fin": 2 * END_RECORD_SIZE}


def act(action: str, seed: int, unit: bytes, following: bytes | None) -> tuple[bytes, bool]:
    """``unit`` (then ``following``, the unit after it) changed by ``action``; and whether
    the connection is to be cut after these bytes."""
    rest = following or b""
    if action == "flip":
        bit = random.Random(seed).randrange(len(unit) * 8)
        changed = bytearray(unit)
        changed[bit // 8] ^= 1 << (bit % 8)
        return bytes(changed) + rest, False
    if action == "drop":
        return rest, False
    if action == "duplicate":
        return unit + unit + rest, False
    if action == "reorder":
        return rest + unit, False
    if action == "truncate":
        return unit[: max(1, len(unit) // 2)], True
    raise ValueError(f"unknown action {action!r}")


class StreamTamperer:
    """One direction of one connection: bytes in, tampered bytes out (sans-IO).

    Units before the target pass at once; the target unit (and for a reorder the unit after
    it) is held until complete, changed, and then everything passes untouched. A target
    still incomplete when the sender ends is never delivered.
    """

    def __init__(
        self, tamper: Tamper | None, size_of: SizeOf, peer_ended: Callable[[], bool] = bool
    ) -> None:
        self.tamper = tamper
        self._peer_ended = peer_ended
        self.seen = False  # the whole target unit (for a truncation: its first half) arrived
        self.reached = False  # ... and the action was taken
        self.done = tamper is None
        self._size_of = size_of
        self._stream = bytearray()
        self._forwarded = 0
        self._index = 0  # unit that starts at self._start
        self._start = 0
        self._quiet = False  # "eof-at-quiet" with a reorder: the silence has come

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Bytes to forward, and whether to cut the connection right after them."""
        if self.done:
            return data, False
        assert self.tamper is not None
        self._stream += data
        stream = bytes(self._stream)
        while self._index < self.tamper.unit:
            size = self._size_of(self._index, stream)
            if size is None or self._start + size > len(stream):
                break
            self._start += size
            self._index += 1
        if self._index < self.tamper.unit:  # every byte so far is in a unit before the target
            return self._forward(len(stream)), False
        out = self._forward(self._start)
        if self.tamper.tail:
            return out + self._forward(len(stream) - self._held()), False
        changed = self._apply(self.tamper, stream)
        if changed is None:
            return out, False
        return out + self._finish(changed[0]), changed[1]

    def _forward(self, upto: int) -> bytes:
        out = bytes(self._stream[self._forwarded : upto]) if upto > self._forwarded else b""
        self._forwarded = max(self._forwarded, upto)
        return out

    def _held(self) -> int:
        assert self.tamper is not None
        if self.tamper.tail == "end-after-peer-fin":
            return len(self._stream) if self._peer_ended() else 0
        if self._quiet:
            return len(self._stream)
        return _HOLD.get(self.tamper.tail, CONTROL_RECORD_SIZE)

    def _finish(self, out: bytes) -> bytes:
        self.done = self.reached = True
        self._stream.clear()
        return out

    def quiet(self) -> tuple[bytes, bool]:
        """The sender has been silent for QUIET seconds (the relay calls this)."""
        if self.done or self.tamper is None or self._index < self.tamper.unit:
            return b"", False
        tail = bytes(self._stream[self._forwarded :])
        if self.tamper.tail != "eof-at-quiet" or len(tail) < CONTROL_RECORD_SIZE:
            return b"", False
        if self.tamper.action == "reorder":  # swapped with what follows: hold on to the FIN
            self._quiet = True
            return b"", False
        self.seen = True
        out, cut = act(self.tamper.action, self.tamper.seed, tail, None)
        return self._finish(out), cut

    def finish(self) -> tuple[bytes, bool]:
        """At the sender's FIN: what is still held, changed for a tail Tamper."""
        if self.done or self.tamper is None or not self.tamper.tail:
            return b"", False  # a target unit still held is incomplete: never delivered
        tail = bytes(self._stream[self._forwarded :])
        size = {"eof-at-fin": _HOLD["eof-at-fin"], "eof-at-quiet": CONTROL_RECORD_SIZE}.get(
            self.tamper.tail, END_RECORD_SIZE
        )
        if len(tail) < size:
            self.done = True
            return tail, False  # the stream ended before its tail: nothing to act on
        self.seen = True
        before, unit = tail[:-size], tail[-size:]
        action, seed = self.tamper.action, self.tamper.seed
        if self.tamper.tail == "eof-at-fin":  # the EOF record, then the end record after it
            eof, end = unit[:-END_RECORD_SIZE], unit[-END_RECORD_SIZE:]
            out, cut = act(action, seed, eof, end)
        elif self.tamper.tail == "eof-at-quiet" and self._quiet:  # a reorder: EOF, then END
            before, unit = b"", tail
            out, cut = act(action, seed, unit[:CONTROL_RECORD_SIZE], unit[CONTROL_RECORD_SIZE:])
        elif self.tamper.tail == "end-at-fin" and action == "reorder":
            out, cut = unit + before[-END_RECORD_SIZE:], False
            before = before[:-END_RECORD_SIZE]
        else:
            out, cut = act(action, seed, unit, None)
        return self._finish(before + out), cut

    def _apply(self, tamper: Tamper, stream: bytes) -> tuple[bytes, bool] | None:
        """The target unit changed (and the rest), or None until enough has arrived."""
        start = self._start
        size = self._size_of(tamper.unit, stream)
        if size is None:
            return None
        end = start + size
        if tamper.action == "truncate":
            cut = start + max(1, size // 2)
            if len(stream) < cut:
                return None
            self.seen = True
            return stream[start:cut], True
        if len(stream) < end:
            return None
        self.seen = True
        following = None
        if tamper.action == "reorder":
            following_size = self._size_of(tamper.unit + 1, stream)
            if following_size is None or len(stream) < end + following_size:
                return None
            following = stream[end : end + following_size]
            end += following_size
        out, cut = act(tamper.action, tamper.seed, stream[start : start + size], following)
        return out + stream[end:], cut


# --------------------------------------------------------------------------- the relay


@dataclass(frozen=True)
class Plan:
    """What to do to a connection: one Tamper, and the layouts of both directions."""

    tamper: Tamper
    layouts: dict[str, Layout]


@dataclass
class Link:
    """One connection through the relay: local side, server side, what went each way."""

    local_side: socket.socket
    server_side: socket.socket
    started: float = field(default_factory=time.monotonic)
    chunks: dict[str, list[tuple[float, bytes]]] = field(default_factory=lambda: {L2S: [], S2L: []})
    tamperers: dict[str, StreamTamperer] = field(default_factory=dict)
    finished: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    upstream_port: int = 0  # our port towards the server: names this link in the server log
    cut: bool = False  # the relay truncated this connection
    ended: dict[str, bool] = field(default_factory=lambda: {L2S: False, S2L: False})  # FIN seen
    finished_at: float = 0.0  # time.monotonic() when both directions had ended

    def sent(self, direction: str) -> bytes:
        return b"".join(data for _, data in self.chunks[direction])

    @property
    def seen(self) -> bool:
        """The target unit arrived whole (a reorder may still wait for the next one)."""
        return any(t.seen for t in self.tamperers.values())

    def plan(self, plan: Plan | None, observer: Observer | None) -> None:
        """Tamper from now on (for a live link: its next bytes start the layout)."""
        with self.lock:
            for direction in (L2S, S2L):
                tamper = plan.tamper if plan and plan.tamper.direction == direction else None
                layout = plan.layouts[direction] if plan else Layout("", ())
                size_of = unit_sizes(layout, observer, lambda: self.sent(L2S))
                other = S2L if direction == L2S else L2S
                peer_ended = functools.partial(self.ended.__getitem__, other)
                self.tamperers[direction] = StreamTamperer(tamper, size_of, peer_ended)


class Relay:
    """A TCP relay on 127.0.0.1 towards ``target_port``; ``plan`` tampers new connections.

    Every connection accepted while ``plan`` is set gets the same tampering, so a local's
    second attempt (its request asked again on a fresh session) meets it too.
    """

    def __init__(self, target_port: int, observer: Observer | None = None) -> None:
        self.target_port = target_port
        self.observer = observer
        self.plan: Plan | None = None
        self.links: list[Link] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(RELAY_POLL)
        self.port: int = self.listener.getsockname()[1]
        self._spawn(self._accept_loop)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                conn.close()
                continue
            link = Link(conn, upstream)
            link.upstream_port = upstream.getsockname()[1]
            link.plan(self.plan, self.observer)
            self.links.append(link)
            self._spawn(self._serve, link)

    def live_links(self) -> list[Link]:
        return [link for link in self.links if not link.finished.is_set()]

    def _serve(self, link: Link) -> None:
        for sock in (link.local_side, link.server_side):
            sock.settimeout(TRANSFER_TIMEOUT)
        pumps = [
            threading.Thread(target=self._pump, args=args, daemon=True)
            for args in (
                (link, link.local_side, link.server_side, L2S),
                (link, link.server_side, link.local_side, S2L),
            )
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        link.local_side.close()
        link.server_side.close()
        link.finished_at = time.monotonic()
        link.finished.set()

    def _pump(self, link: Link, source: socket.socket, sink: socket.socket, direction: str) -> None:
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([source], [], [], RELAY_POLL)
                if not readable:
                    silent = time.monotonic() - last
                    if silent > RELAY_IDLE_LIMIT:
                        raise TimeoutError("relay idle")
                    if silent >= QUIET:
                        with link.lock:
                            out, cut = link.tamperers[direction].quiet()
                        if self._deliver(link, sink, out, cut):
                            return
                    continue
                data = source.recv(65536)
                last = time.monotonic()
                if not data:
                    break
                with link.lock:
                    link.chunks[direction].append((last - link.started, data))
                    out, cut = link.tamperers[direction].feed(data)
                if self._deliver(link, sink, out, cut):
                    return
            with link.lock:
                link.ended[direction] = True
                out, cut = link.tamperers[direction].finish()
            if self._deliver(link, sink, out, cut):
                return
            if not link.cut:
                sink.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            # A reset or an error on one side (ValueError: select on a closed socket): the
            # other side gets a reset too, unless this is the aftermath of a truncation.
            if link.cut:
                return
            for sock in (link.local_side, link.server_side):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)

    @staticmethod
    def _deliver(link: Link, sink: socket.socket, out: bytes, cut: bool) -> bool:
        """Send ``out``; for a truncation end both ways with a plain FIN (True: done)."""
        if out:
            sink.sendall(out)
        if cut:
            link.cut = True
            _shutdown_both(link)
        return cut

    def wait_idle(self, links: list[Link], timeout: float, live: int = 0) -> bool:
        """Whether all but ``live`` of ``links`` have finished within ``timeout``."""
        return wait_for(lambda: sum(not link.finished.is_set() for link in links) <= live, timeout)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


def _shutdown_both(link: Link) -> None:
    for sock in (link.local_side, link.server_side):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- the transfers


@dataclass
class Received:
    """What the destination got on one connection, and how its reading ended."""

    data: bytearray = field(default_factory=bytearray)
    peer_port: int = 0  # the server's end of this connection (the BND port of the reply)
    ended: str = ""  # "eof", "reset" or "timeout"
    send_error: str = ""
    finished: threading.Event = field(default_factory=threading.Event)


class Exchange(TCPServer):
    """A destination that sends ``download`` (paced or in one go) while it reads; with
    nothing to send, it half-closes only after the client's EOF (so that its EOF frame
    comes after every WINDOW frame of the upload)."""

    def __init__(self, download: bytes = DOWNLOAD, paced: bool = True) -> None:
        self.received: list[Received] = []
        self.download = download
        self.paced = paced
        super().__init__(self._exchange)

    def _exchange(self, conn: socket.socket, peer: Any) -> None:
        result = Received(peer_port=peer[1])
        self.received.append(result)
        conn.settimeout(TRANSFER_TIMEOUT)
        try:
            sender = threading.Thread(
                target=send_then_end, args=(conn, self.download, result, self.paced), daemon=True
            )
            if self.download:
                sender.start()
            try:
                while data := conn.recv(65536):
                    result.data += data
                result.ended = "eof"
            except ConnectionResetError:
                result.ended = "reset"
            except TimeoutError:
                result.ended = "timeout"
            except OSError as exc:
                result.ended = f"error: {exc}"
            if not self.download:
                sender.start()  # the end, at last
            sender.join(TRANSFER_TIMEOUT)
            _reset_seen_by_the_writer(result)
        finally:
            result.finished.set()


def send_then_end(sock: socket.socket, data: bytes, outcome: Any, paced: bool = True) -> None:
    """Write ``data`` (in CHUNK-byte writes PACE apart if ``paced``), then half-close."""
    try:
        if paced:
            for start in range(0, len(data), CHUNK):
                sock.sendall(data[start : start + CHUNK])
                time.sleep(PACE)
        else:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        outcome.send_error = type(exc).__name__


@dataclass
class ClientOutcome:
    """What the SOCKS client saw: the reply (None if none came), the download, the end."""

    reply: int | None = None
    bind_port: int = 0  # the server's end of its connection to the destination
    downloaded: bytes = b""
    ended: str = ""  # "eof", "reset" or "timeout"
    seconds: float = 0.0
    send_error: str = ""


def exchange(
    local_port: int,
    dest_port: int,
    upload: bytes = UPLOAD,
    paced: bool = True,
    timeout: float = TRANSFER_TIMEOUT,
) -> ClientOutcome:
    """CONNECT through the local to an Exchange at ``dest_port``; upload while downloading.
    With nothing to upload the client half-closes only when it has read to the end (so that
    its EOF frame comes after every WINDOW frame of the download)."""
    outcome = ClientOutcome()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", local_port), timeout=timeout) as sock:
        try:
            socks_handshake(sock)
            sock.sendall(build_request(Request(CMD_CONNECT, Address("127.0.0.1", dest_port))))
            buf = bytearray()
            reply, bind, used = recv_parsed(sock, buf, parse_reply)
            outcome.reply = int(reply)
            outcome.bind_port = bind.port
            rest = bytes(buf[used:])
        except EOFError:
            outcome.ended = "eof"
        except ConnectionResetError:
            outcome.ended = "reset"
        except TimeoutError:
            outcome.ended = "timeout"
        if outcome.ended:
            outcome.seconds = time.monotonic() - started
            return outcome
        uploader = None
        if outcome.reply == 0 and upload:
            uploader = threading.Thread(
                target=send_then_end, args=(sock, upload, outcome, paced), daemon=True
            )
            uploader.start()
        outcome.downloaded, outcome.ended = read_to_end(sock, rest)
        outcome.seconds = time.monotonic() - started
        if uploader is not None:
            uploader.join(timeout)
            _reset_seen_by_the_writer(outcome)
    return outcome


def _reset_seen_by_the_writer(outcome: Received | ClientOutcome) -> None:
    """Linux reports a reset once, to whichever call comes first: when the writing thread
    got it, the reading thread sees a plain EOF. The peer never closes cleanly while we
    still write (the programs end a relay only after both directions ended), so an EOF
    that came with a reset to the writer was a reset."""
    if outcome.ended == "eof" and outcome.send_error == "ConnectionResetError":
        outcome.ended = "reset"


def is_prefix(part: bytes | bytearray, whole: bytes) -> bool:
    return whole[: len(part)] == part


# --------------------------------------------------------------------------- server introspection


_RSA_LINE = re.compile(r"rsa private-key operations so far: (\d+)")


def rsa_operations(server: Program, timeout: float = 10.0) -> int:
    """The server's count of RSA private-key operations, asked for with SIGUSR1."""
    seen = len(_RSA_LINE.findall(server.stderr()))
    os.kill(server.proc.pid, signal.SIGUSR1)
    assert wait_for(lambda: len(_RSA_LINE.findall(server.stderr())) > seen, timeout), (
        f"no summary after SIGUSR1:\n{server.stderr()[-2000:]}"
    )
    return int(_RSA_LINE.findall(server.stderr())[-1])


def handshake_failure(server: Program, port: int) -> str | None:
    """Why the server refused the connection from 127.0.0.1:``port`` (its log), if it did."""
    marker = f"handshake from 127.0.0.1:{port} failed: "
    for line in server.stderr().splitlines():
        if marker in line:
            return line.split(marker, 1)[1]
    return None


def session_end(server: Program, port: int) -> str | None:
    """How the server's session with 127.0.0.1:``port`` ended (its log), if it did."""
    pattern = re.compile(rf"session from 127\.0\.0\.1:{port} \([^)]*\) ended: (.*)$")
    for line in server.stderr().splitlines():
        found = pattern.search(line)
        if found:
            return found[1]
    return None


# --------------------------------------------------------------------------- first flights


def server_public(path: Path) -> hs.ServerPublic:
    """What a local knows of a server, from the server's public key file."""
    key, share = load_server_public_key(path)
    return hs.ServerPublic(key, share)


def client_init(
    identity: RsaKey,
    server: hs.ServerPublic,
    early: bytes = b"",
    clock: Callable[[], float] = time.time,
) -> bytes:
    """A genuine ClientInit from ``identity`` (a fresh R, ``early`` riding in it)."""
    return hs.ClientHandshake(identity, server, clock=clock).create_client_init(early)


_FORGING = threading.Lock()


def forged_client_init(
    signer: RsaKey, claimed: RsaKey, server: hs.ServerPublic, early: bytes = b""
) -> bytes:
    """A ClientInit naming ``claimed``'s fingerprint, signed by ``signer`` over a transcript
    that names it: only the key that signed is wrong."""
    with (
        _FORGING,
        mock.patch.object(hs, "fingerprint_bytes", lambda _key: fingerprint_bytes(claimed)),
    ):
        return client_init(signer, server, early)


@dataclass
class ProbeResult:
    """What a connection that sent ``sent`` got back, and when the server closed it."""

    name: str
    sent: int
    half_close: bool
    bytes_back: int = 0
    seconds: float = 0.0
    ended: str = ""  # "eof", "reset" or "timeout"


def probe(
    port: int, name: str, data: bytes, half_close: bool, timeout: float, source: str = "127.0.0.1"
) -> ProbeResult:
    """Connect (from ``source``), send ``data`` (then a FIN if ``half_close``), read until
    the server closes."""
    result = ProbeResult(name, len(data), half_close)
    started = time.monotonic()
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as sock:
        try:
            if data:
                sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, result.ended = read_to_end(sock)
    result.seconds = time.monotonic() - started
    result.bytes_back = len(answer)
    return result


def _tls_client_hello() -> bytes:
    """A TLS 1.2 record header and a ClientHello-shaped body (random inside)."""
    body = b"\x01\x00\x01\xfc\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
    body += b"\x00\x02\x13\x01\x01\x00" + os.urandom(508 - len(body))
    return b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body


def _flip(data: bytes, position: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 0x04
    return bytes(changed)


def stranger_probes(keys_dir: Path, destination_port: int, genuine: bytes) -> dict[str, bytes]:
    """What a stranger (or a recorder) may send the server's port; ``genuine`` is a
    ClientInit the server has already accepted (its replay)."""
    local = load_private_key(keys_dir / "local_private.pem")
    other = load_private_key(keys_dir / "other_private.pem")
    server = server_public(keys_dir / "server_public.pem")
    elsewhere = hs.ServerPublic(other.public_key(), static_x25519(other).share)
    request = Request(CMD_CONNECT, Address("127.0.0.1", destination_port))
    early = open_frame(1, encode_tunnel_request(request))
    valid = client_init(local, server, early)
    return {
        "empty": b"",
        "random 1 B": os.urandom(1),
        "random 89 B": os.urandom(89),
        "random 90 B": os.urandom(90),
        "random 500 B": os.urandom(500),
        "random 5000 B": os.urandom(5000),
        "HTTP GET": b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8\r\n\r\n",
        "TLS ClientHello": _tls_client_hello(),
        "SOCKS5 greeting": b"\x05\x01\x00",
        "ClientInit truncated": valid[: len(valid) // 2],
        "ClientInit, header bit flipped": _flip(valid, hs.INIT_PREFIX_SIZE + 3),
        "ClientInit, body bit flipped": _flip(valid, hs.INIT_HEAD_SIZE + 40),
        "ClientInit replayed": genuine,
        "ClientInit, unknown key": client_init(other, server, early),
        "ClientInit, forged signature": forged_client_init(other, local, server, early),
        "ClientInit to another server": client_init(local, elsewhere, early),
        "ClientInit 2 min old": client_init(local, server, early, lambda: time.time() - 120),
        "ClientInit 2 min ahead": client_init(local, server, early, lambda: time.time() + 120),
    }


def probe_table(results: list[ProbeResult]) -> str:
    lines = [f"{'what was sent':32} {'bytes':>6} {'FIN':>4} {'back':>5} {'closed after':>13}"]
    for r in results:
        fin = "yes" if r.half_close else "no"
        lines.append(
            f"{r.name:32} {r.sent:>6} {fin:>4} {r.bytes_back:>5} {r.seconds:>11.3f} s ({r.ended})"
        )
    return "\n".join(lines)


def closed_without_answer(sock: socket.socket) -> bool:
    """The peer closes (EOF or reset) without sending a byte."""
    rest, ended = read_to_end(sock)
    return rest == b"" and ended in ("eof", "reset")


@contextlib.contextmanager
def timed(limit: float) -> Iterator[None]:
    """Fail if the block takes longer than ``limit`` seconds."""
    started = time.monotonic()
    yield
    assert time.monotonic() - started < limit
