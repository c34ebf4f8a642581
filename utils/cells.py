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
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from utils.buffers import BufferPool
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
    count = _checked_count(len(payload))
    cells = bytearray(randomness[: count * CELL_SIZE])
    if len(cells) != count * CELL_SIZE:
        raise ValueError("not enough randomness for the padding")
    pack_cells_into(memoryview(cells), payload)
    return cells


def _checked_count(length: int) -> int:
    count = cell_count(length)
    if not 0 < count <= MAX_CELLS_PER_RECORD:
        raise ValueError(f"payload of {length} bytes does not fit one record")
    return count


def pack_cells_into(cells: memoryview, payload: bytes | memoryview) -> None:
    """``pack_cells`` in place: ``cells`` is exactly the cells' size and holds the randomness."""
    length = len(payload)
    count = _checked_count(length)
    if len(cells) != count * CELL_SIZE:
        raise ValueError("cells buffer of the wrong size")
    full = length // MAX_CELL_PAYLOAD
    view = memoryview(payload)
    if count <= _VECTOR_THRESHOLD:
        full = 0
    else:
        _pack_full_vectorised(cells, view[: full * MAX_CELL_PAYLOAD], full)
    for index in range(full, count):
        start = index * MAX_CELL_PAYLOAD
        cell = cells[index * CELL_SIZE : (index + 1) * CELL_SIZE]
        _pack_one(cell, view[start : start + MAX_CELL_PAYLOAD])


# A cell's 4-byte header read as one little-endian word: offset | length << 8 | version << 16.
_WORD = np.dtype("<u4")
_FULL_HEADER = MAX_CELL_PAYLOAD << 8 | CELL_VERSION << 16
_FULL_SPAN = CELL_SIZE - MIN_OFFSET - MAX_CELL_PAYLOAD + 1  # offsets a full cell may take


def _header_words(cells: memoryview, count: int) -> np.ndarray:
    """The first word of each of the first ``count`` cells, as a writable view."""
    words: np.ndarray = np.frombuffer(cells, dtype=_WORD)[: count * CELL_SIZE // 4]
    return words.reshape(count, CELL_SIZE // 4)[:, 0]


def _pack_full_vectorised(cells: memoryview, payload: memoryview, full: int) -> None:
    """Place ``full`` 50-byte chunks into the first ``full`` cells in one numpy scatter."""
    headers = _header_words(cells, full)
    offsets = MIN_OFFSET + (((headers & 0xFFFF) * _FULL_SPAN) >> 16)  # as _offset_for
    _windows(cells)[_CELL_BASES[:full] + offsets] = _chunks(payload, full)
    headers[:] = offsets | _FULL_HEADER


# A cell's payload as one numpy item: fancy indexing then moves 50 bytes per index at
# once (twice as fast as rows of 50 uint8).
_CHUNK = np.dtype(("V", MAX_CELL_PAYLOAD))


def _windows(buffer: bytes | bytearray | memoryview) -> np.ndarray:
    """Every 50-byte window of ``buffer`` as the items of a view (item i starts at byte i).

    Item ``64 * cell + offset`` is that cell's payload, so one fancy index moves all of them.
    """
    view: np.ndarray = np.ndarray(  # annotated: numpy's stubs give Any under Python 3.10
        (len(buffer) - MAX_CELL_PAYLOAD + 1,), _CHUNK, buffer, 0, (1,)
    )
    return view


def _chunks(buffer: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    """The first ``count`` 50-byte chunks of ``buffer``, as items."""
    return np.frombuffer(buffer, dtype=_CHUNK, count=count)


def unpack_cells(cells: bytes | bytearray | memoryview) -> bytes:
    """Recover the payload from opened cells; raise ChannelError on any malformed cell.

    Canonical form only: version 1, reserved 0, every cell but the last carries 50 bytes,
    the last 1..50, and each payload lies inside its cell after the header.
    """
    out = bytearray(len(cells))
    with memoryview(out) as view:
        length = unpack_cells_into(memoryview(cells), view)
    return bytes(out[:length])


def unpack_cells_into(cells: memoryview, out: memoryview) -> int:
    """``unpack_cells`` into ``out`` (at least as long as ``cells``); the payload's length."""
    size = len(cells)
    count = size // CELL_SIZE
    if size == 0 or size % CELL_SIZE or count > MAX_CELLS_PER_RECORD:
        raise ChannelError(f"record body of {size} bytes is not a whole number of cells")
    if count <= _VECTOR_THRESHOLD:
        body = _unpack_small(cells, count)
        out[: len(body)] = body
        return len(body)
    headers = _header_words(cells, count - 1)  # the last cell is checked on its own
    # A full cell's header word is _FULL_HEADER plus an offset in [4, 14]: every field is
    # checked by the word's range (two reductions, no temporaries).
    if (
        headers.min() < _FULL_HEADER + MIN_OFFSET
        or headers.max() >= _FULL_HEADER + MIN_OFFSET + _FULL_SPAN
    ):
        raise ChannelError("malformed cell in record")
    offsets = headers - _FULL_HEADER
    full = (count - 1) * MAX_CELL_PAYLOAD
    # (np.take with out= would skip a temporary but is 20x slower)
    _chunks(out, count - 1)[...] = _windows(cells)[_CELL_BASES[: count - 1] + offsets]
    last = _unpack_one(cells[size - CELL_SIZE :], last=True)
    out[full : full + len(last)] = last
    return full + len(last)


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


class _Nonces:
    """The counter nonces of one direction: 0, 1, 2, ... (one per AES-GCM operation)."""

    def __init__(self) -> None:
        self._counter = 0

    def next(self) -> bytes:
        if self._counter > MAX_NONCE_COUNTER:
            raise ChannelError("nonce counter exhausted; the connection must end")
        nonce = _NONCE.pack(self._counter)
        self._counter += 1
        return nonce


PADDING = PaddingSource()
_ONE_CELL_COUNT = COUNT_FORMAT.pack(1)
_ONE_CELL_RECORD = SEALED_COUNT_SIZE + CELL_SIZE + TAG_SIZE
_CELLS_AREA = MAX_CELLS_PER_RECORD * CELL_SIZE
MAX_SEALED_RECORD = SEALED_COUNT_SIZE + _CELLS_AREA + TAG_SIZE
_PAYLOAD_AREA = _CELLS_AREA + MAX_SEALED_RECORD
# One record's scratch: its cells in clear, the sealed record (or the opened payload), then
# the payload gathered from its parts.
_BUFFERS = BufferPool(_PAYLOAD_AREA + MAX_RECORD_PAYLOAD)


def _fill_from(take: Callable[[int], bytes]) -> Callable[[memoryview], None]:
    def fill(out: memoryview) -> None:
        out[:] = take(len(out))

    return fill


class RecordSealer:
    """Seals one direction of the channel: payload bytes in, record bytes out.

    ``padding`` (for the test vectors) gives the padding bytes; by default they come
    from the process's PaddingSource.
    """

    def __init__(self, key: bytes, padding: Callable[[int], bytes] | None = None) -> None:
        self._aead = Aead(key)
        self._nonces = _Nonces()
        self._fill = PADDING.fill if padding is None else _fill_from(padding)
        self.ended = False

    def seal(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Records carrying ``payload`` (any length, split at MAX_RECORD_PAYLOAD)."""
        records: list[bytes] = []
        self.seal_to(payload, lambda record: records.append(bytes(record)))
        return b"".join(records)

    def seal_to(
        self, payload: bytes | bytearray | memoryview, send: Callable[[memoryview], object]
    ) -> None:
        """``seal`` without copies: each record goes to ``send`` as a view of a scratch
        buffer, valid only until ``send`` returns."""
        if self.ended:
            raise ChannelError("data after the end of stream")
        if 0 < len(payload) <= MAX_CELL_PAYLOAD:
            send(memoryview(self._seal_one(memoryview(payload))))
            return
        view = memoryview(payload)
        with _BUFFERS.borrow() as buffer:
            for start in range(0, len(view), MAX_RECORD_PAYLOAD):
                send(self._seal_record(view[start : start + MAX_RECORD_PAYLOAD], buffer))

    def seal_parts_to(
        self, parts: Sequence[bytes | memoryview], send: Callable[[memoryview], object]
    ) -> None:
        """``seal_to`` for a payload given in parts (at most one record's worth: more is
        joined first), gathered straight into the scratch buffer."""
        size = sum(len(part) for part in parts)
        if size > MAX_RECORD_PAYLOAD or self.ended or 0 < size <= MAX_CELL_PAYLOAD:
            self.seal_to(b"".join(parts), send)  # (a one-cell record: the short path)
            return
        with _BUFFERS.borrow() as buffer:
            position = _PAYLOAD_AREA
            for part in parts:
                buffer[position : position + len(part)] = part
                position += len(part)
            if size:
                send(self._seal_record(buffer[_PAYLOAD_AREA:position], buffer))

    def _seal_record(self, chunk: memoryview, buffer: memoryview) -> memoryview:
        count = cell_count(len(chunk))
        size = count * CELL_SIZE
        cells = buffer[:size]
        self._fill(cells)
        pack_cells_into(cells, chunk)
        record = buffer[_CELLS_AREA : _CELLS_AREA + SEALED_COUNT_SIZE + size + TAG_SIZE]
        count_bytes = COUNT_FORMAT.pack(count)
        self._aead.seal_into(self._nonces.next(), count_bytes, record[:SEALED_COUNT_SIZE])
        self._aead.seal_into(self._nonces.next(), cells, record[SEALED_COUNT_SIZE:])
        return record

    def _seal_one(self, chunk: memoryview) -> bytes:
        """A one-cell record (a request, a reply, a small write: every record of a short
        connection) without the scratch buffers: the same bytes, half the time."""
        cell = bytearray(CELL_SIZE)
        self._fill(memoryview(cell))
        _pack_one(cell, chunk)
        return self._aead.seal(self._nonces.next(), _ONE_CELL_COUNT) + self._aead.seal(
            self._nonces.next(), cell
        )

    def seal_end(self) -> bytes:
        """The authenticated end-of-stream record."""
        self.ended = True
        return self._aead.seal(self._nonces.next(), COUNT_FORMAT.pack(0))


class RecordOpener:
    """Opens one direction of the channel: feed it wire bytes, get payload chunks back.

    Raises ChannelError on the first byte that does not authenticate; nothing from a
    record is returned before its whole record has been verified.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = Aead(key)
        self._nonces = _Nonces()
        self._buffer = bytearray()
        self._pending_cells = 0
        self.ended = False

    def _open(self, sealed: memoryview) -> bytes:
        try:
            return self._aead.open(self._nonces.next(), sealed)
        except AuthenticationError:
            raise ChannelError("record failed authentication") from None

    def _open_cells(self, sealed: memoryview, scratch: memoryview) -> memoryview:
        cells = scratch[: len(sealed) - TAG_SIZE]
        try:
            self._aead.open_into(self._nonces.next(), sealed, cells)
        except AuthenticationError:
            raise ChannelError("record failed authentication") from None
        self._pending_cells = 0
        payload = scratch[_CELLS_AREA:]
        return payload[: unpack_cells_into(cells, payload)]

    def _next_size(self) -> int:
        if self._pending_cells:
            return self._pending_cells * CELL_SIZE + TAG_SIZE
        return SEALED_COUNT_SIZE

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take wire bytes; return the payloads of every record they complete."""
        return [bytes(payload) for payload in self.records(data)]

    def records(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """``feed`` without copies: each payload is a view of a scratch buffer, valid only
        until the next one is asked for. Iterate to the end (or let an error end it)."""
        if self.ended and data:
            raise ChannelError("bytes after the end of stream")
        if len(data) == _ONE_CELL_RECORD and not self._buffer and not self._pending_cells:
            one = self._open_one(memoryview(data))
            if one is not None:
                yield one
                return
            data = memoryview(data)[SEALED_COUNT_SIZE:]  # its cells: the general path
        if self._buffer:
            self._buffer += data
            source: bytes | bytearray | memoryview = self._buffer
        else:
            source = data  # the common case: no copy into the buffer
        position = 0
        with memoryview(source) as view, _BUFFERS.borrow() as scratch:
            while not self.ended:
                size = self._next_size()
                if len(view) - position < size:
                    break
                sealed = view[position : position + size]
                position += size
                if self._pending_cells:
                    yield self._open_cells(sealed, scratch)
                else:
                    self._start_record(self._open(sealed))
            rest = bytes(view[position:])
        self._buffer = bytearray(rest)
        if self.ended and rest:
            raise ChannelError("bytes after the end of stream")

    def _open_one(self, record: memoryview) -> memoryview | None:
        """A read that holds exactly one one-cell record (the common small one), opened
        without the scratch buffers; None (its count taken) if the record has more cells."""
        self._start_record(self._open(record[:SEALED_COUNT_SIZE]))
        if self._pending_cells != 1:
            return None
        cell = self._open(record[SEALED_COUNT_SIZE:])
        self._pending_cells = 0
        return memoryview(_unpack_one(memoryview(cell), last=True))

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
