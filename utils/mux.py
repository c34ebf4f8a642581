"""Streams multiplexed over one session (docs/PROTOCOL.md section 4), sans-IO.

Inside the records of a session, each direction is a sequence of frames::

    type (1) | stream (4) | length (2) | body (length)

Many client connections share one authenticated session, as channels share an SSH
connection (RFC 4254): a new connection costs one round trip to the server instead of a
TCP and a cryptographic handshake. Each stream has its own flow-control window per
direction, so a client that stops reading stalls only its own stream.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from utils.cells import MAX_RECORD_PAYLOAD
from utils.errors import ProtocolError

_HEADER = struct.Struct(">BIH")
HEADER_SIZE = _HEADER.size
MAX_FRAME_BODY = 65535
MAX_DATA_FRAME = 16384
INITIAL_WINDOW = 512 * 1024  # bytes a sender may have in flight per stream and direction
# What each receiver opens its window to at once, with a WINDOW frame in the record that
# opens (OPEN) or accepts (REPLY) the stream: 512 KiB kept one bulk stream at ~60% of what
# the programs can move on loopback, and at 10 MB/s at 50 ms RTT. OpenSSH's channels use
# 2 MB as well; a stalled stream holds at most this much at each end.
STREAM_WINDOW = 2 * 1024 * 1024
OPENING_GRANT = STREAM_WINDOW - INITIAL_WINDOW
MAX_STREAM_ID = 2**32 - 1
SESSION_STREAM = 0
PING_SIZE = 8
_WINDOW = struct.Struct(">I")
# The most stream bytes whose DATA frames fill one record exactly: a relay reads at most this
# much at a time, so a bulk read is one record, not a full one and a 49-byte one.
MAX_RECORD_DATA = MAX_RECORD_PAYLOAD - HEADER_SIZE * -(-MAX_RECORD_PAYLOAD // MAX_DATA_FRAME)


class FrameType(enum.IntEnum):
    OPEN = 0x01  # local -> server: CMD ATYP ADDR PORT
    REPLY = 0x02  # server -> local: REP ATYP ADDR PORT
    DATA = 0x03
    WINDOW = 0x04  # 4-byte increment of the sender's window for this stream
    EOF = 0x05  # this direction of the stream has ended (a half-close)
    RESET = 0x06  # the stream is aborted: both directions, no clean end
    PING = 0x07  # session: 8 opaque bytes, answered with PONG
    PONG = 0x08
    GOAWAY = 0x09  # session: no new streams; the ones open may finish


_TYPES = {int(kind): kind for kind in FrameType}
SESSION_FRAMES = frozenset((FrameType.PING, FrameType.PONG, FrameType.GOAWAY))
_EMPTY_FRAMES = frozenset((FrameType.EOF, FrameType.RESET, FrameType.GOAWAY))


@dataclass(frozen=True)
class Frame:
    type: FrameType
    stream: int
    body: bytes = b""

    def encode(self) -> bytes:
        return _HEADER.pack(self.type, self.stream, len(self.body)) + self.body


def open_frame(stream: int, request: bytes) -> bytes:
    return Frame(FrameType.OPEN, stream, request).encode()


def reply_frame(stream: int, reply: bytes) -> bytes:
    return Frame(FrameType.REPLY, stream, reply).encode()


def opening_frames(stream: int, request: bytes, early: bytes | memoryview) -> bytes:
    """What opens a stream: OPEN, the client's first bytes, the receive window's grant."""
    return open_frame(stream, request) + data_frames(stream, early) + opening_grant(stream)


def opening_grant(stream: int) -> bytes:
    return window_frame(stream, OPENING_GRANT)


def data_frames(stream: int, data: bytes | memoryview) -> bytes:
    """DATA frames for ``data`` (split at MAX_DATA_FRAME)."""
    return b"".join(data_frame_parts(stream, data))


def data_frame_parts(stream: int, data: bytes | memoryview) -> list[bytes | memoryview]:
    """``data_frames`` as headers and views of ``data``, for a sealer to copy once."""
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for start in range(0, len(view), MAX_DATA_FRAME):
        chunk = view[start : start + MAX_DATA_FRAME]
        parts.append(_HEADER.pack(FrameType.DATA, stream, len(chunk)))
        parts.append(chunk)
    return parts


def window_frame(stream: int, increment: int) -> bytes:
    return Frame(FrameType.WINDOW, stream, _WINDOW.pack(increment)).encode()


def eof_frame(stream: int) -> bytes:
    return Frame(FrameType.EOF, stream).encode()


def reset_frame(stream: int) -> bytes:
    return Frame(FrameType.RESET, stream).encode()


def ping_frame(opaque: bytes, answer: bool = False) -> bytes:
    kind = FrameType.PONG if answer else FrameType.PING
    return Frame(kind, SESSION_STREAM, opaque).encode()


def goaway_frame() -> bytes:
    return Frame(FrameType.GOAWAY, SESSION_STREAM).encode()


def window_increment(frame: Frame) -> int:
    (increment,) = _WINDOW.unpack(frame.body)
    return int(increment)


def _check(kind: FrameType, stream: int, length: int) -> None:
    if (kind in SESSION_FRAMES) != (stream == SESSION_STREAM):
        raise ProtocolError(f"{kind.name} frame on stream {stream}")
    if kind in _EMPTY_FRAMES and length:
        raise ProtocolError(f"{kind.name} frame with a body")
    if kind is FrameType.WINDOW and length != _WINDOW.size:
        raise ProtocolError("WINDOW frame of the wrong size")
    if kind in (FrameType.PING, FrameType.PONG) and length != PING_SIZE:
        raise ProtocolError(f"{kind.name} frame of the wrong size")
    if kind is FrameType.DATA and not 0 < length <= MAX_DATA_FRAME:
        raise ProtocolError(f"DATA frame of {length} bytes")
    if kind in (FrameType.OPEN, FrameType.REPLY) and not length:
        raise ProtocolError(f"empty {kind.name} frame")


_Span = tuple[FrameType, int, int, int]  # type, stream, where the body starts and ends


class FrameDecoder:
    """Record payloads in, whole frames out (a frame may span records).

    With ``merge_data``, adjacent DATA frames of one stream come out as one frame (its body
    may then pass the frame limit): the receiver hands a whole record's bytes on in one
    write, not one per frame, and copies them once.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview, merge_data: bool = False) -> list[Frame]:
        if self._buffer:
            self._buffer += data
            source: bytes | bytearray | memoryview = self._buffer
        else:
            source = data  # the common case (frames end with records): no copy into a buffer
        spans: list[_Span] = []
        with memoryview(source) as view:
            position = self._split(view, spans)
            frames = _frames(view, spans, merge_data)
            rest = bytes(view[position:])
        self._buffer = bytearray(rest)
        return frames

    @staticmethod
    def _split(view: memoryview, spans: list[_Span]) -> int:
        """Note every whole frame in ``view``; return how many bytes they took."""
        position = 0
        while len(view) - position >= HEADER_SIZE:
            raw_kind, stream, length = _HEADER.unpack_from(view, position)
            kind = _TYPES.get(raw_kind)
            if kind is None:
                raise ProtocolError(f"unknown frame type {raw_kind:#04x}")
            if not (kind is FrameType.DATA and stream and 0 < length <= MAX_DATA_FRAME):
                _check(kind, stream, length)  # (the common case above needs no more checks)
            end = position + HEADER_SIZE + length
            if len(view) < end:
                break
            spans.append((kind, stream, position + HEADER_SIZE, end))
            position = end
        return position

    @property
    def pending(self) -> int:
        return len(self._buffer)


def _frames(view: memoryview, spans: list[_Span], merge_data: bool) -> list[Frame]:
    frames: list[Frame] = []
    index = 0
    while index < len(spans):
        kind, stream, start, end = spans[index]
        run = index + 1
        if merge_data and kind is FrameType.DATA:
            while run < len(spans) and spans[run][:2] == (kind, stream):
                run += 1
        if run - index > 1:
            body = b"".join(view[span[2] : span[3]] for span in spans[index:run])
        else:
            body = bytes(view[start:end])
        frames.append(Frame(kind, stream, body))
        index = run
    return frames


class ReceiveWindow:
    """The receiving side of one stream direction: how much the peer may still send,
    and when to give it more (after half the window has been consumed)."""

    def __init__(self, size: int = INITIAL_WINDOW) -> None:
        self._size = size
        self._available = size  # what the peer may still send
        self._consumed = 0  # consumed since the last WINDOW frame

    def received(self, count: int) -> None:
        if count > self._available:
            raise ProtocolError("peer overran the stream's flow-control window")
        self._available -= count

    def consumed(self, count: int) -> int:
        """Record ``count`` bytes handed on; the increment to announce now, or 0."""
        self._consumed += count
        if self._consumed < self._size // 2:
            return 0
        increment, self._consumed = self._consumed, 0
        self._available += increment
        return increment


class SendWindow:
    """The sending side of one stream direction: the credit the peer has granted."""

    def __init__(self, size: int = INITIAL_WINDOW) -> None:
        self.credit = size

    def grant(self, increment: int) -> None:
        if self.credit + increment > 2**31 - 1:
            raise ProtocolError("flow-control window grew past 2**31 - 1")
        self.credit += increment

    def take(self, wanted: int) -> int:
        """Up to ``wanted`` bytes of credit (0 when the window is closed)."""
        granted = min(wanted, self.credit)
        self.credit -= granted
        return granted
