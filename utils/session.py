"""A session on a socket: records in and out, frames dispatched to streams (threaded runtime).

One reader thread per session opens records and hands each frame to its stream; it never
blocks on anything but the session socket (a stream's inbox is bounded by its window, and
the rare frames the reader must answer go out on a pool thread), so one slow client can
stall only its own stream. Writers (the relay threads of every stream) share the socket
under a lock: sealing and sending a record is one step, since records are numbered.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from utils.cells import RecordOpener, RecordSealer
from utils.channel import ReadSize, receive_into, send_all
from utils.errors import ChannelError, ProtocolError, SockproxyError
from utils.handshake import SessionKeys
from utils.mux import (
    MAX_RECORD_DATA,
    PING_SIZE,
    STREAM_WINDOW,
    Frame,
    FrameDecoder,
    FrameType,
    ReceiveWindow,
    SendWindow,
    data_frame_parts,
    eof_frame,
    opening_grant,
    ping_frame,
    reply_frame,
    reset_frame,
    window_frame,
    window_increment,
)
from utils.platform_support import wait_writable
from utils.socks5 import Reply
from utils.workers import WORKERS

log = logging.getLogger("sockproxy.session")

RECV_SIZE = 256 * 1024
DEFAULT_TIMEOUT = 300.0


class StreamReset(ChannelError):
    """The stream was aborted: by the peer (RESET), by its session ending, or here."""


class Stream:
    """One client connection inside a session, as the relay sees it."""

    def __init__(self, session: Session, stream_id: int) -> None:
        self.id = stream_id
        self.session = session
        self._cond = threading.Condition()
        self._inbox: collections.deque[bytes] = collections.deque()
        self._receive_window = ReceiveWindow(STREAM_WINDOW)  # opened by the first frames
        self._send_window = SendWindow()
        self._peer_ended = False
        self._reset: str | None = None
        self._reply: bytes | None = None
        self._direct: Callable[[bytes], int] | None = None
        self._writing = False  # the stream's writer thread is handing bytes on
        self._grant = 0  # window the reader thread has freed and not yet announced
        self.timeout = DEFAULT_TIMEOUT  # for the callers that give none
        self._on_reply: Callable[[bytes], None] | None = None

    # -- called by the session's reader thread: never blocks
    def deliver(self, frame: Frame) -> None:
        kind = frame.type
        with self._cond:
            if kind is FrameType.DATA:
                self._receive_window.received(len(frame.body))
                body = self._write_through(frame.body)
                if body:
                    self._inbox.append(body)
            elif kind is FrameType.WINDOW:
                self._send_window.grant(window_increment(frame))
            elif kind is FrameType.EOF:
                self._peer_ended = True
            elif kind is FrameType.RESET:
                self._mark_reset("reset by the peer")
            elif kind is FrameType.REPLY:
                self._reply = frame.body
            if kind is not FrameType.DATA or self._inbox:
                self._cond.notify_all()  # (not for bytes already handed on)
        if kind is FrameType.REPLY and self._on_reply is not None:
            self._on_reply(frame.body)
        if self._grant:
            self._announce_grant()

    def write_through(self, write: Callable[[bytes], int]) -> None:
        """Let the reader thread hand DATA on itself with ``write`` (which never blocks and
        returns how much it took) while nothing is queued: one thread hand-off less per
        record. The writer thread takes the rest, in order."""
        with self._cond:
            self._direct = write

    def _write_through(self, body: bytes) -> bytes:
        """Under the lock: what is left of ``body`` after a direct write (if allowed)."""
        if self._direct is None or self._inbox or self._writing or self._reset is not None:
            return body
        try:
            written = self._direct(body)
        except OSError:
            return body  # the writer thread will meet the error and report it
        self._grant += self._receive_window.consumed(written)
        return body[written:]

    def _announce_grant(self) -> None:
        with self._cond:
            increment, self._grant = self._grant, 0
        if increment and self._reset is None:
            self.session.send_later(window_frame(self.id, increment))

    def watch_reply(self, callback: Callable[[bytes], None]) -> None:
        """Fast open: ``callback`` gets the REPLY when it comes (at once if it already has)."""
        with self._cond:
            reply, self._on_reply = self._reply, callback
        if reply is not None:
            callback(reply)

    def sent_early(self, count: int) -> None:
        """``count`` bytes went out with the OPEN: they use up window like any DATA."""
        with self._cond:
            self._send_window.take(count)

    def reply(self, body: bytes) -> None:
        """The server's answer to the OPEN; a success (REP 0x00) opens the receive window."""
        accepted = body[:1] == bytes((Reply.SUCCEEDED,))
        self.session.send(
            reply_frame(self.id, body) + (opening_grant(self.id) if accepted else b"")
        )

    def lost(self, reason: str) -> None:
        """The session ended under this stream."""
        with self._cond:
            self._mark_reset(reason)
            self._cond.notify_all()

    def _mark_reset(self, reason: str) -> None:
        if self._reset is None:
            self._reset = reason

    # -- called by the relay threads
    def wait_reply(self, timeout: float) -> bytes:
        """The server's REPLY body (the local side); raises StreamReset if the session died."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._reply is not None or self._reset, timeout):
                raise TimeoutError("no reply from the server")
            if self._reply is None:
                raise StreamReset(self._reset or "reset")
            return self._reply

    def send(self, data: bytes | memoryview, timeout: float | None = None) -> None:
        """Send ``data`` as DATA frames, waiting for window credit (at most ``timeout`` s
        at a time without progress)."""
        timeout = self.timeout if timeout is None else timeout
        view = memoryview(data)
        while view:
            with self._cond:
                if not self._cond.wait_for(
                    lambda: self._send_window.credit > 0 or self._reset, timeout
                ):
                    raise TimeoutError("the peer granted no window")
                self._raise_if_reset()
                granted = self._send_window.take(min(len(view), MAX_RECORD_DATA))
            self.session.send(data_frame_parts(self.id, view[:granted]))  # one record
            view = view[granted:]

    def receive(self, timeout: float | None = None) -> list[bytes]:
        """What has arrived; [] once the peer has ended its direction cleanly.
        Call ``consumed`` after handing the bytes on, to reopen the window."""
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            self._writing = False
            if not self._cond.wait_for(
                lambda: self._inbox or self._peer_ended or self._reset, timeout
            ):
                raise TimeoutError("nothing received")
            if self._inbox:
                chunks = list(self._inbox)
                self._inbox.clear()
                self._writing = True  # until the next receive(): no direct writes meanwhile
                return chunks
            self._raise_if_reset()
            return []

    def consumed(self, count: int) -> None:
        with self._cond:
            increment = self._receive_window.consumed(count)
        if increment and self._reset is None:
            self.session.send(window_frame(self.id, increment))

    def send_end(self) -> None:
        with self._cond:
            self._raise_if_reset()
        self.session.send(eof_frame(self.id))

    def abort(self, reason: str) -> None:
        """Stop both directions; the peer gets a RESET (if the session still works)."""
        with self._cond:
            already = self._reset is not None
            self._mark_reset(reason)
            self._cond.notify_all()
        if not already:
            self.session.send_quietly(reset_frame(self.id))

    def close(self) -> None:
        """Done with the stream: the session forgets it."""
        self.session.forget(self.id)

    def _raise_if_reset(self) -> None:
        if self._reset is not None:
            raise StreamReset(self._reset)


class Session:
    """Records over one TCP connection, and the streams they carry."""

    def __init__(
        self, sock: socket.socket, keys: SessionKeys, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """``timeout``: a socket that brings no byte, or takes none, for this long is dead."""
        sock.setblocking(False)  # utils/channel.py: one system call per send and per read
        self.sock = sock
        self.timeout = timeout
        self._sealer = RecordSealer(keys.send)
        self._opener = RecordOpener(keys.receive)
        self._decoder = FrameDecoder()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self.highest_stream = 0
        self.closed: str | None = None
        self.draining = False  # GOAWAY received: no new streams
        self.started = time.monotonic()
        self.last_received = self.started
        self.ping_sent_at: float | None = None
        self._deferred: bytes | None = None  # early data held until the peer proves liveness

    # -- sending
    def send(self, frames: bytes | list[bytes | memoryview]) -> None:
        """Send frames, given whole or in parts (``data_frame_parts``)."""
        with self._send_lock:
            self._send_locked(frames)

    def _send_locked(self, frames: bytes | list[bytes | memoryview]) -> None:
        if self.closed is not None:
            raise StreamReset(self.closed)
        try:
            if isinstance(frames, list):
                self._sealer.seal_parts_to(frames, self._send_record)
            else:
                self._sealer.seal_to(frames, self._send_record)
        except BaseException as exc:
            # A record may be half-sent: the byte stream is broken for every stream.
            self._fail(f"send failed: {type(exc).__name__}")
            raise

    def _send_record(self, record: bytes | memoryview) -> None:
        send_all(self.sock, record, self.timeout)

    def send_quietly(self, frames: bytes) -> None:
        try:
            self.send(frames)
        except (OSError, SockproxyError):
            pass  # the session is ending anyway; its streams learn it from close()

    def send_later(self, frames: bytes) -> None:
        """For the reader thread, which must never wait on the socket's send buffer: a
        small record goes out now if no one else is sending and the socket has room (no
        thread hand-off), else a pool thread sends it."""
        if self._send_lock.acquire(blocking=False):
            try:
                if wait_writable(self.sock):
                    with contextlib.suppress(OSError, SockproxyError):
                        self._send_locked(frames)
                    return
            finally:
                self._send_lock.release()
        WORKERS.submit(self.send_quietly, frames)

    def ping(self) -> None:
        self.ping_sent_at = time.monotonic()
        self.send_later(ping_frame(os.urandom(PING_SIZE)))

    def end(self) -> None:
        """A clean end: the authenticated end of stream, then a half-close."""
        with self._send_lock:
            if self.closed is None and not self._sealer.ended:
                try:
                    self._send_record(self._sealer.seal_end())
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    # -- streams
    def add(self, stream_id: int) -> Stream:
        with self._lock:
            if self.closed is not None:
                raise StreamReset(self.closed)
            if stream_id <= self.highest_stream:
                raise ProtocolError(f"stream {stream_id} is not new")
            self.highest_stream = stream_id
            stream = self._streams[stream_id] = Stream(self, stream_id)
            return stream

    def forget(self, stream_id: int) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    @property
    def stream_count(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- receiving
    def read_loop(self, on_open: Callable[[Stream, bytes], None] | None = None) -> str | None:
        """Run the reader until the session ends; None on a clean end, else why it failed.
        ``on_open`` (the server) is called for each OPEN frame, with the stream added."""
        reason: str | None = None
        try:
            self._read(on_open)
        except TimeoutError:
            reason = "session timeout"
        except (OSError, SockproxyError) as exc:
            reason = str(exc) if isinstance(exc, SockproxyError) else type(exc).__name__
        if reason is None:
            self.end()  # the peer ended cleanly: answer with our own end-of-stream record
        self._fail(reason or "session ended")
        return reason

    def accept_pending(self, data: bytes, on_open: Callable[[Stream, bytes], None] | None) -> None:
        """Records that arrived in the same reads as the end of the handshake."""
        if data:
            self._feed(data, on_open)

    def _read(self, on_open: Callable[[Stream, bytes], None] | None) -> None:
        read_size = ReadSize(RECV_SIZE, low=4096)  # an idle session keeps a small buffer
        buffer = bytearray()
        while not self._opener.ended:
            if len(buffer) != read_size.size:
                buffer = bytearray(read_size.size)
            received = receive_into(self.sock, buffer, self.timeout)
            if not received:
                self._opener.check_clean_eof()
                return
            read_size.update(received)
            self._feed(memoryview(buffer)[:received], on_open)
        if receive_into(self.sock, bytearray(1), self.timeout):
            raise ChannelError("bytes after the end of stream")

    def _feed(
        self, data: bytes | memoryview, on_open: Callable[[Stream, bytes], None] | None
    ) -> None:
        self.last_received = time.monotonic()
        self.ping_sent_at = None  # anything from the peer shows it is alive
        for payload in self._opener.records(data):
            if self._deferred is not None and on_open is not None:
                deferred, self._deferred = self._deferred, None
                self.feed_early(deferred, on_open)
            for frame in self._decoder.feed(payload, merge_data=True):
                self._dispatch(frame, on_open)

    def defer_early(self, frames: bytes) -> None:
        """Hold the ClientInit's early data until the first record under the session keys
        arrives: a ClientInit replayed after a restart (the replay cache is empty then)
        cannot produce one, so its early data is never acted on."""
        self._deferred = frames

    def feed_early(self, frames: bytes, on_open: Callable[[Stream, bytes], None]) -> None:
        """The server: frames that rode in the ClientInit."""
        for frame in self._decoder.feed(frames):
            self._dispatch(frame, on_open)
        if self._decoder.pending:
            raise ProtocolError("early data ends inside a frame")

    def _dispatch(self, frame: Frame, on_open: Callable[[Stream, bytes], None] | None) -> None:
        kind = frame.type
        if kind is FrameType.PING:
            self.send_later(ping_frame(frame.body, answer=True))
        elif kind is FrameType.GOAWAY:
            self.draining = True
        elif kind is FrameType.PONG:
            pass  # _feed already noted that the peer is alive
        elif kind is FrameType.OPEN:
            if on_open is None:
                raise ProtocolError("OPEN frame sent to the local")
            on_open(self.add(frame.stream), frame.body)
        else:
            self._to_stream(frame)

    def _to_stream(self, frame: Frame) -> None:
        with self._lock:
            stream = self._streams.get(frame.stream)
            known = frame.stream <= self.highest_stream
        if stream is not None:
            stream.deliver(frame)
        elif not known:
            raise ProtocolError(f"{frame.type.name} frame for stream {frame.stream} never opened")
        # else: a frame still in flight for a stream that has ended here; drop it

    # -- ending
    def close(self, reason: str) -> None:
        """End the session at once; every stream still in it is reset."""
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.closed is not None:
                return
            self.closed = reason
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.lost(f"session lost: {reason}")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
