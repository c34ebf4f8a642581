"""Helpers of the attack tests (tests/test_attacks.py): a tampering relay, paced transfers.

The relay sits between a real local.py and a real server.py (the local's ``server_port``
points at it). It cuts each direction's byte stream into *units* the way an observer without
keys can: the handshake messages by their clear length prefix (the local's first message
type tells a full handshake, where the server sends three messages, from a resumed one,
where it sends two), then the first record (the request or the reply: a payload of at most
50 bytes is one cell, 98 bytes on the wire), then data records whose size it predicts from
the paced transfers below (1000-byte writes become records of 18 + 20 * 64 + 16 bytes), and
last the 18-byte end-of-stream record right before the sender's FIN. One unit of one
direction is then flipped, dropped, duplicated, swapped with the next unit, or the stream
is cut half-way through it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from Crypto.Hash import SHA256
from Crypto.PublicKey.RSA import RsaKey
from Crypto.Signature import pss

from tests.conftest import Program, TCPServer, read_to_end, recv_parsed, socks_handshake, wait_for
from utils import handshake as hs
from utils.socks5 import CMD_CONNECT, Address, Request, build_request, parse_reply

L2S = "l2s"  # local -> server
S2L = "s2l"  # server -> local
ACTIONS = ("flip", "drop", "duplicate", "reorder", "truncate")

# What the relay knows of the wire format (docs/PROTOCOL.md sections 2, 3 and 5): how many
# handshake messages each direction sends before its first record, per handshake kind.
FRAMED_UNITS = {L2S: {"full": 2, "resumed": 2}, S2L: {"full": 3, "resumed": 2}}
TAMPER_PHASES = ("hello", "handshake", "control", "data", "end")  # see Tamper
CONTROL_RECORD_SIZE = 18 + 64 + 16  # the request or the reply: one cell
END_RECORD_SIZE = 18  # the end-of-stream record: a sealed count of 0, right before the FIN
CHUNK = 1000  # bytes per paced write of the transfers
CHUNKS = 20
PACE = 0.01  # seconds between paced writes: each write becomes its own record
DATA_RECORD_SIZE = 18 + (CHUNK // 50) * 64 + 16
DATA_UNIT = 5  # the data record a "data" Tamper acts on: five whole records get through first

# The transfers: fixed pseudo-random bytes, so a wrong byte anywhere shows.
DOWNLOAD = random.Random(b"sockproxy download").randbytes(CHUNK * CHUNKS)
UPLOAD = random.Random(b"sockproxy upload").randbytes(CHUNK * CHUNKS)

RELAY_POLL = 0.2  # relay sockets wake this often to look at their stop flag
RELAY_IDLE_LIMIT = 30.0  # a relayed connection silent this long is cut
TRANSFER_TIMEOUT = 15.0  # socket timeout of the in-test client and destination


@dataclass(frozen=True)
class Tamper:
    """One action on one unit of ``direction``.

    ``phase`` names the unit: "hello" the ServerHello, "handshake" the local's first
    handshake message or the server's first after its hello, "control" the request or the
    reply record, "data" the DATA_UNIT-th data record after it, "end" the end-of-stream
    record (the last 18 bytes before the sender's FIN; a reorder swaps it with the 18 bytes
    before it). A flip picks its bit from ``seed``.
    """

    direction: str
    phase: str
    action: str
    seed: int = 0


class StreamTamperer:
    """One direction of one connection: bytes in, tampered bytes out (sans-IO).

    Units before the target pass at once; the target unit (and for a reorder the unit after
    it) is held until complete, changed, and then everything passes untouched. ``kind``
    tells whether the connection runs a "full" or a "resumed" handshake (None while
    unknown): the server sends a different number of messages in each.
    """

    def __init__(
        self, direction: str, tamper: Tamper | None, kind: Callable[[], str | None]
    ) -> None:
        self.direction = direction
        self.tamper = tamper
        self.seen = False  # the whole target unit (for a truncation: its first half) arrived
        self.reached = False  # ... and the action was taken
        self.done = tamper is None
        self._kind = kind
        self._stream = bytearray()
        self._forwarded = 0
        self._index = 0  # unit that starts at self._start
        self._start = 0

    def _framed(self) -> int | None:
        kind = self._kind()
        return None if kind is None else FRAMED_UNITS[self.direction][kind]

    def _size(self, index: int, start: int) -> int | None:
        """Wire size of unit ``index`` starting at ``start``; None until it can be told."""
        framed = 1 if index == 0 else self._framed()
        if framed is None:
            return None
        if index < framed:  # a handshake message: its clear length prefix says
            head = self._stream[start : start + 2]
            return 2 + int.from_bytes(head, "big") if len(head) == 2 else None
        return CONTROL_RECORD_SIZE if index == framed else DATA_RECORD_SIZE

    def _target(self, tamper: Tamper) -> int | None:
        if tamper.phase == "hello":
            return 0
        if tamper.phase == "handshake":
            return 1 if self.direction == S2L else 0
        framed = self._framed()
        if framed is None:
            return None
        if tamper.phase == "end":
            return framed + 1  # from the first data record on, the tail is held back
        return framed if tamper.phase == "control" else framed + 1 + DATA_UNIT

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Bytes to forward, and whether to cut the connection right after them."""
        if self.done:
            return data, False
        assert self.tamper is not None
        self._stream += data
        target = self._target(self.tamper)
        before = target if target is not None else 1  # units surely before the target
        while self._index < before:
            size = self._size(self._index, self._start)
            if size is None or self._start + size > len(self._stream):
                break
            self._start += size
            self._index += 1
        if self._index < before:  # every byte so far is in a unit before the target
            out = bytes(self._stream[self._forwarded :])
            self._forwarded = len(self._stream)
            return out, False
        out = bytes(self._stream[self._forwarded : self._start])
        self._forwarded = max(self._forwarded, self._start)
        if target is None:  # which unit is the target is not known yet: hold the rest
            return out, False
        if self.tamper.phase == "end":  # keep the last two 18-byte pieces until the EOF
            keep = max(self._forwarded, len(self._stream) - 2 * END_RECORD_SIZE)
            out += bytes(self._stream[self._forwarded : keep])
            self._forwarded = keep
            return out, False
        changed = self._apply(self.tamper, target)
        if changed is None:
            return out, False
        tampered, cut = changed
        self.done = self.reached = True
        self._stream.clear()
        return out + tampered, cut

    def finish(self) -> tuple[bytes, bool]:
        """At the sender's EOF: what is still held, changed for an "end" Tamper.

        Any other target unit still held is incomplete, and is never delivered.
        """
        if self.done or self.tamper is None or self.tamper.phase != "end":
            return b"", False
        tail = bytes(self._stream[self._forwarded :])
        self.done = True
        if len(tail) < END_RECORD_SIZE:
            return tail, False  # the stream ended before its data: nothing to act on
        self.seen = self.reached = True
        before, end = tail[:-END_RECORD_SIZE], tail[-END_RECORD_SIZE:]
        action = self.tamper.action
        if action == "flip":
            bit = random.Random(self.tamper.seed).randrange(END_RECORD_SIZE * 8)
            changed = bytearray(end)
            changed[bit // 8] ^= 1 << (bit % 8)
            return before + bytes(changed), False
        if action == "drop":
            return before, False
        if action == "duplicate":
            return before + end + end, False
        if action == "reorder":
            return before[:-END_RECORD_SIZE] + end + before[-END_RECORD_SIZE:], False
        if action == "truncate":
            return before + end[: END_RECORD_SIZE // 2], True
        raise ValueError(f"unknown action {action!r}")

    def _apply(self, tamper: Tamper, target: int) -> tuple[bytes, bool] | None:
        """The target unit changed (and the rest), or None until enough has arrived."""
        start = self._start
        size = self._size(target, start)
        if size is None:
            return None
        end = start + size
        if tamper.action == "truncate":
            cut = start + max(1, size // 2)
            if len(self._stream) < cut:
                return None
            self.seen = True
            return bytes(self._stream[start:cut]), True
        if len(self._stream) < end:
            return None
        self.seen = True
        unit = bytearray(self._stream[start:end])
        if tamper.action == "flip":
            bit = random.Random(tamper.seed).randrange(size * 8)
            unit[bit // 8] ^= 1 << (bit % 8)
            return bytes(unit) + bytes(self._stream[end:]), False
        if tamper.action == "drop":
            return bytes(self._stream[end:]), False
        if tamper.action == "duplicate":
            return bytes(unit + unit) + bytes(self._stream[end:]), False
        if tamper.action == "reorder":
            following = self._size(target + 1, end)
            if following is None or len(self._stream) < end + following:
                return None
            after = end + following
            return bytes(self._stream[end:after] + unit + self._stream[after:]), False
        raise ValueError(f"unknown action {tamper.action!r}")


@dataclass
class Link:
    """One connection through the relay: local side, server side, what went each way."""

    local_side: socket.socket
    server_side: socket.socket
    tamper: Tamper | None
    started: float = field(default_factory=time.monotonic)
    chunks: dict[str, list[tuple[float, bytes]]] = field(default_factory=lambda: {L2S: [], S2L: []})
    tamperers: dict[str, StreamTamperer] = field(default_factory=dict)
    finished: threading.Event = field(default_factory=threading.Event)
    upstream_port: int = 0  # our port towards the server: names this link in the server log
    cut: bool = False  # the relay truncated this connection

    def sent(self, direction: str) -> bytes:
        return b"".join(data for _, data in self.chunks[direction])

    @property
    def first_message_type(self) -> int | None:
        """0x02 (ClientHello) for a full handshake, 0x06 (ResumeHello) for a resumed one."""
        head = self.sent(L2S)[:3]
        return head[2] if len(head) == 3 else None

    def kind(self) -> str | None:
        """Which handshake ("full" or "resumed") the local started; None before it spoke."""
        first = self.first_message_type
        if first is None:
            return None
        return "resumed" if first == hs.RESUME_HELLO else "full"

    @property
    def seen(self) -> bool:
        """The target unit arrived whole (a reorder may still wait for the next one)."""
        return any(t.seen for t in self.tamperers.values())


class Relay:
    """A TCP relay on 127.0.0.1 towards ``target_port``; ``plan`` tampers new connections.

    Every connection accepted while ``plan`` is set gets the same tampering, so a local's
    second attempt (a full handshake after a failed resumption) meets it too.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.plan: Tamper | None = None
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
            link = Link(conn, upstream, self.plan)
            link.upstream_port = upstream.getsockname()[1]
            for direction in (L2S, S2L):
                plan = link.tamper if link.tamper and link.tamper.direction == direction else None
                link.tamperers[direction] = StreamTamperer(direction, plan, link.kind)
            self.links.append(link)
            self._spawn(self._serve, link)

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
        link.finished.set()

    def _pump(self, link: Link, source: socket.socket, sink: socket.socket, direction: str) -> None:
        tamperer = link.tamperers[direction]
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([source], [], [], RELAY_POLL)
                if not readable:
                    if time.monotonic() - last > RELAY_IDLE_LIMIT:
                        raise TimeoutError("relay idle")
                    continue
                data = source.recv(65536)
                last = time.monotonic()
                if not data:
                    break
                link.chunks[direction].append((last - link.started, data))
                out, cut = tamperer.feed(data)
                if out:
                    sink.sendall(out)
                if cut:  # a truncation: both ways end here with a plain FIN
                    link.cut = True
                    for sock in (link.local_side, link.server_side):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                    return
            rest, cut = tamperer.finish()
            if rest:
                sink.sendall(rest)
            if cut:
                link.cut = True
                for sock in (link.local_side, link.server_side):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            elif not link.cut:
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

    def wait_idle(self, links: list[Link], timeout: float) -> bool:
        """Whether every link in ``links`` has finished within ``timeout``."""
        return wait_for(lambda: all(link.finished.is_set() for link in links), timeout)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


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
    """A destination that sends DOWNLOAD in paced writes while it reads the upload."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        super().__init__(self._exchange)

    def _exchange(self, conn: socket.socket, peer: Any) -> None:
        result = Received(peer_port=peer[1])
        self.received.append(result)
        conn.settimeout(TRANSFER_TIMEOUT)
        try:
            sender = threading.Thread(
                target=_paced_send, args=(conn, DOWNLOAD, result), daemon=True
            )
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
            sender.join(TRANSFER_TIMEOUT)
            _reset_seen_by_the_writer(result)
        finally:
            result.finished.set()


def _paced_send(sock: socket.socket, data: bytes, outcome: Any) -> None:
    """Write ``data`` in CHUNK-byte writes PACE apart, then half-close."""
    try:
        for start in range(0, len(data), CHUNK):
            sock.sendall(data[start : start + CHUNK])
            time.sleep(PACE)
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


def exchange(local_port: int, dest_port: int, timeout: float = TRANSFER_TIMEOUT) -> ClientOutcome:
    """CONNECT through the local to the Exchange at ``dest_port``; upload while downloading."""
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
        if outcome.reply == 0:
            uploader = threading.Thread(
                target=_paced_send, args=(sock, UPLOAD, outcome), daemon=True
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


def access_line_for(server: Program, port: int) -> str | None:
    """The server's access log line of the connection that came from 127.0.0.1:``port``."""
    for line in server.stderr().splitlines():
        if " sockproxy.access: " in line and f" 127.0.0.1:{port} " in f" {line.split(': ', 1)[1]}":
            return line
    return None


# --------------------------------------------------------------------------- forged handshakes


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_server_hello(sock: socket.socket) -> bytes:
    """The framed ServerHello the server sends first."""
    head = recv_exactly(sock, 2)
    return head + recv_exactly(sock, int.from_bytes(head, "big"))


def forged_client_messages(
    server_hello: bytes, signer: RsaKey, claimed: RsaKey, server_public: RsaKey
) -> bytes:
    """ClientHello + ClientSignature naming ``claimed``'s fingerprint, signed by ``signer``.

    A real ClientHandshake with the wrong key, whose fingerprint bytes are patched to an
    authorized key's; the signature is then made again over the patched transcript, so only
    the key that signed is wrong.
    """
    client = hs.ClientHandshake(signer, server_public)
    reader = hs.MessageReader()
    reader.feed(client.receive(server_hello))
    messages = reader.take(2)
    assert messages is not None
    body = bytearray(messages[0].body)
    body[hs.RANDOM_SIZE : hs.RANDOM_SIZE + hs.FINGERPRINT_SIZE] = hs.key_fingerprint(claimed)
    hello = hs.frame(hs.CLIENT_HELLO, bytes(body))
    digest = SHA256.new(hs.CLIENT_SIGNATURE_LABEL + server_hello + hello)
    signature = bytes(pss.new(signer).sign(digest))
    return hello + hs.frame(hs.CLIENT_SIGNATURE, signature)


def closed_without_answer(sock: socket.socket) -> bool:
    """The peer closes (EOF or reset) without sending a byte."""
    rest, ended = read_to_end(sock)
    return rest == b"" and ended in ("eof", "reset")
