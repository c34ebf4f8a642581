"""64-byte cells and AES-256-GCM records: the channel's data format (sans-IO, the hot path).

A *cell* is the design's fixed 64-byte unit::

    offset(1) length(1) version(1)=1 reserved(1)=0 | padding | payload (<= 50) | padding

with ``offset`` drawn at random from [4, 64 - length]. Cells are never sent bare: a *record*
is an AES-256-GCM-sealed cell count followed by the GCM-sealed cells, each under its own
counter nonce, so every byte on the wire is encrypted and authenticated, and a record that is
tampered with, reordered, replayed or cut short fails to open. A count of zero is the
authenticated end of stream: a TCP EOF without it means the stream was truncated.

Framing many cells at once uses numpy (no per-cell Python loop); a few cells take a short
pure-Python path, which is faster for interactive traffic. Both give identical bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from utils.crypto import TAG_SIZE, Aead, PaddingSource
from utils.errors import AuthenticationError, ChannelError

CELL_SIZE = 64
CELL_HEADER_SIZE = 4
MAX_CELL_PAYLOAD = 50
CELL_VERSION = 1
MIN_OFFSET = CELL_HEADER_SIZE

COUNT_FORMAT = struct.Struct(">H")
SEALED_COUNT_SIZE = COUNT_FORMAT.size + TAG_SIZE
MAX_CELLS_PER_RECORD = 2048
MAX_RECORD_PAYLOAD = MAX_CELLS_PER_RECORD * MAX_CELL_PAYLOAD
MAX_NONCE_COUNTER = 2**64 - 1
_NONCE = struct.Struct(">4xQ")

# Below this many cells the numpy set-up costs more than a Python loop.
_VECTOR_THRESHOLD = 8
_CELL_BASES = np.arange(MAX_CELLS_PER_RECORD, dtype=np.intp) * CELL_SIZE


def cell_count(payload_length: int) -> int:
    """Number of cells that carry ``payload_length`` bytes."""
    return -(-payload_length // MAX_CELL_PAYLOAD)


def _offset_for(random16: int, length: int) -> int:
    """Map 16 random bits onto [4, 64 - length], near-uniformly (bias below 2**-10)."""
    return MIN_OFFSET + (random16 * (CELL_SIZE - MIN_OFFSET - length + 1) >> 16)


def _pack_one(cell: bytearray | memoryview, chunk: bytes | memoryview) -> None:
    """Frame one cell in place; ``cell`` already holds 64 random bytes."""
    length = len(chunk)
    offset = _offset_for(cell[0] | cell[1] << 8, length)
    cell[0:4] = bytes((offset, length, CELL_VERSION, 0))
    cell[offset : offset + length] = chunk


def pack_cells(payload: bytes | memoryview, randomness: bytes | bytearray) -> bytearray:
    """Frame ``payload`` (1..MAX_RECORD_PAYLOAD bytes) into cells.

    ``randomness`` holds at least ``64 * cell_count(len(payload))`` random bytes; they become
    the padding, and the first two bytes of each cell choose its offset. Every cell but the
    last carries 50 bytes.
    """
    length = len(payload)
    count = cell_count(length)
    if not 0 < count <= MAX_CELLS_PER_RECORD:
        raise ValueError(f"payload of {length} bytes does not fit one record")
    cells = bytearray(randomness[: count * CELL_SIZE])
    if len(cells) != count * CELL_SIZE:
        raise ValueError("not enough randomness for the padding")
    full = length // MAX_CELL_PAYLOAD
    view = memoryview(payload)
    if count <= _VECTOR_THRESHOLD:
        full = 0
    else:
        _pack_full_vectorised(cells, view[: full * MAX_CELL_PAYLOAD], full)
    for index in range(full, count):
        start = index * MAX_CELL_PAYLOAD
        cell = memoryview(cells)[index * CELL_SIZE : (index + 1) * CELL_SIZE]
        _pack_one(cell, view[start : start + MAX_CELL_PAYLOAD])
    return cells


def _pack_full_vectorised(cells: bytearray, payload: memoryview, full: int) -> None:
    """Place ``full`` 50-byte chunks into the first ``full`` cells in one numpy scatter."""
    flat = np.frombuffer(cells, dtype=np.uint8)
    rows = flat[: full * CELL_SIZE].reshape(full, CELL_SIZE)
    random16 = rows[:, 0].astype(np.intp) | (rows[:, 1].astype(np.intp) << 8)
    span = CELL_SIZE - MIN_OFFSET - MAX_CELL_PAYLOAD + 1
    offsets = MIN_OFFSET + ((random16 * span) >> 16)
    windows = _windows(cells)
    chunks = np.frombuffer(payload, dtype=np.uint8).reshape(full, MAX_CELL_PAYLOAD)
    windows[_CELL_BASES[:full] + offsets] = chunks
    rows[:, 0] = offsets
    rows[:, 1] = MAX_CELL_PAYLOAD
    rows[:, 2] = CELL_VERSION
    rows[:, 3] = 0


def _windows(buffer: bytes | bytearray | memoryview) -> np.ndarray:
    """Every 50-byte window of ``buffer`` as rows of a view (row i starts at byte i).

    Row ``64 * cell + offset`` is that cell's payload, so one fancy index moves all of them.
    """
    view: np.ndarray = np.ndarray(  # annotated: numpy's stubs give Any under Python 3.10
        (len(buffer) - MAX_CELL_PAYLOAD + 1, MAX_CELL_PAYLOAD), np.uint8, buffer, 0, (1, 1)
    )
    return view


def unpack_cells(cells: bytes | bytearray | memoryview) -> bytes:
    """Recover the payload from opened cells; raise ChannelError on any malformed cell.

    Canonical form only: version 1, reserved 0, every cell but the last carries 50 bytes,
    the last 1..50, and each payload lies inside its cell after the header.
    """
    size = len(cells)
    count = size // CELL_SIZE
    if size == 0 or size % CELL_SIZE or count > MAX_CELLS_PER_RECORD:
        raise ChannelError(f"record body of {size} bytes is not a whole number of cells")
    if count <= _VECTOR_THRESHOLD:
        return _unpack_small(memoryview(cells), count)
    flat = np.frombuffer(cells, dtype=np.uint8)
    rows = flat.reshape(count, CELL_SIZE)
    offsets = rows[:-1, 0].astype(np.intp)
    valid = (
        (rows[:, 2] == CELL_VERSION).all()
        and not rows[:, 3].any()
        and (rows[:-1, 1] == MAX_CELL_PAYLOAD).all()
        and (offsets >= MIN_OFFSET).all()
        and (offsets <= CELL_SIZE - MAX_CELL_PAYLOAD).all()
    )
    if not valid:
        raise ChannelError("malformed cell in record")
    windows = _windows(cells)
    body: bytes = windows[_CELL_BASES[: count - 1] + offsets].tobytes()
    return body + _unpack_one(memoryview(cells)[size - CELL_SIZE :], last=True)


def _unpack_small(cells: memoryview, count: int) -> bytes:
    parts = [
        _unpack_one(cells[i * CELL_SIZE : (i + 1) * CELL_SIZE], last=i == count - 1)
        for i in range(count)
    ]
    return b"".join(parts)


def _unpack_one(cell: memoryview, last: bool) -> bytes:
    offset, length, version, reserved = cell[0], cell[1], cell[2], cell[3]
    length_ok = 0 < length <= MAX_CELL_PAYLOAD if last else length == MAX_CELL_PAYLOAD
    if (
        version != CELL_VERSION
        or reserved
        or not length_ok
        or not MIN_OFFSET <= offset <= CELL_SIZE - length
    ):
        raise ChannelError("malformed cell")
    return bytes(cell[offset : offset + length])


def _nonce(counter: int) -> bytes:
    if counter > MAX_NONCE_COUNTER:
        raise ChannelError("nonce counter exhausted; the connection must end")
    return _NONCE.pack(counter)


PADDING = PaddingSource()


class RecordSealer:
    """Seals one direction of the channel: payload bytes in, record bytes out."""

    def __init__(self, key: bytes, padding: Callable[[int], bytes] | None = None) -> None:
        self._aead = Aead(key)
        self._counter = 0
        self._padding = padding if padding is not None else PADDING.take
        self.ended = False

    def _seal(self, plaintext: bytes | bytearray) -> bytes:
        nonce = _nonce(self._counter)
        self._counter += 1
        return self._aead.seal(nonce, plaintext)

    def seal(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Records carrying ``payload`` (any length, split at MAX_RECORD_PAYLOAD)."""
        if self.ended:
            raise ChannelError("data after the end of stream")
        view = memoryview(payload)
        records = []
        for start in range(0, len(view), MAX_RECORD_PAYLOAD):
            chunk = view[start : start + MAX_RECORD_PAYLOAD]
            count = cell_count(len(chunk))
            cells = pack_cells(chunk, self._padding(count * CELL_SIZE))
            records.append(self._seal(COUNT_FORMAT.pack(count)))
            records.append(self._seal(cells))
        return b"".join(records)

    def seal_end(self) -> bytes:
        """The authenticated end-of-stream record."""
        self.ended = True
        return self._seal(COUNT_FORMAT.pack(0))


class RecordOpener:
    """Opens one direction of the channel: feed it wire bytes, get payload chunks back.

    Raises ChannelError on the first byte that does not authenticate; nothing from a
    record is returned before its whole record has been verified.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = Aead(key)
        self._counter = 0
        self._buffer = bytearray()
        self._pending_cells = 0
        self.ended = False

    def _open(self, sealed: memoryview) -> bytes:
        nonce = _nonce(self._counter)
        self._counter += 1
        try:
            return self._aead.open(nonce, sealed)
        except AuthenticationError:
            raise ChannelError("record failed authentication") from None

    def _next_size(self) -> int:
        if self._pending_cells:
            return self._pending_cells * CELL_SIZE + TAG_SIZE
        return SEALED_COUNT_SIZE

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take wire bytes; return the payloads of every record they complete."""
        if self.ended and data:
            raise ChannelError("bytes after the end of stream")
        if self._buffer:
            self._buffer += data
            source: bytes | bytearray | memoryview = self._buffer
        else:
            source = data  # the common case: no copy into the buffer
        payloads: list[bytes] = []
        with memoryview(source) as view:
            used = self._consume(view, payloads)
            rest = bytes(view[used:])
        self._buffer = bytearray(rest)
        if self.ended and rest:
            raise ChannelError("bytes after the end of stream")
        return payloads

    def _consume(self, view: memoryview, payloads: list[bytes]) -> int:
        """Open every complete step in ``view``; return how many bytes were used."""
        position = 0
        while not self.ended:
            size = self._next_size()
            if len(view) - position < size:
                break
            opened = self._open(view[position : position + size])
            position += size
            if self._pending_cells:
                self._pending_cells = 0
                payloads.append(unpack_cells(opened))
            else:
                self._start_record(opened)
        return position

    def _start_record(self, opened_count: bytes) -> None:
        (count,) = COUNT_FORMAT.unpack(opened_count)
        if count > MAX_CELLS_PER_RECORD:
            raise ChannelError(f"record of {count} cells exceeds the limit")
        self.ended = count == 0
        self._pending_cells = count

    def check_clean_eof(self) -> None:
        """Call at TCP EOF: raise ChannelError unless the end-of-stream record came first."""
        if not self.ended:
            raise ChannelError("channel closed without an end-of-stream record (truncated)")
