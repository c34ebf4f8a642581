"""Cells and records: round trips on any split of the stream, and every way to break them."""

from __future__ import annotations

import os
import random
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import utils.cells as cells_module
from utils.cells import (
    CELL_SIZE,
    MAX_CELL_PAYLOAD,
    MAX_RECORD_PAYLOAD,
    RecordOpener,
    RecordSealer,
    cell_count,
    pack_cells,
    unpack_cells,
)
from utils.crypto import Aead
from utils.errors import ChannelError

KEY = bytes(range(32))
payloads = st.binary(min_size=1, max_size=3 * MAX_CELL_PAYLOAD * 12)
seeds = st.integers(0, 2**32)


def _randomness(seed: int, cells: int = 80) -> bytes:
    """Reproducible stand-in for padding randomness (tests only: not a secret)."""
    return random.Random(seed).randbytes(64 * cells)


def _sealed_stream(chunks: list[bytes], end: bool = True) -> bytes:
    sealer = RecordSealer(KEY)
    stream = b"".join(sealer.seal(chunk) for chunk in chunks)
    return stream + (sealer.seal_end() if end else b"")


@given(chunks=st.lists(payloads, max_size=6), data=st.data())
@settings(max_examples=150, deadline=None)
def test_round_trip_on_arbitrary_split_points(chunks: list[bytes], data: st.DataObject) -> None:
    stream = _sealed_stream(chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    opener = RecordOpener(KEY)
    received = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        received += opener.feed(stream[start:stop])
    assert b"".join(received) == b"".join(chunks)
    assert opener.ended
    opener.check_clean_eof()


@given(payload=payloads, seed=seeds)
@settings(max_examples=200, deadline=None)
def test_pack_unpack_round_trip_and_layout(payload: bytes, seed: int) -> None:
    randomness = _randomness(seed)
    packed = pack_cells(payload, randomness)
    assert len(packed) == CELL_SIZE * cell_count(len(payload))
    assert unpack_cells(packed) == payload
    for start in range(0, len(packed), CELL_SIZE):
        offset, length, version, reserved = packed[start : start + 4]
        assert (version, reserved) == (1, 0)
        assert 4 <= offset <= CELL_SIZE - length
        # Padding is the caller's randomness, untouched.
        cell, source = packed[start : start + 64], randomness[start : start + 64]
        assert cell[4:offset] == source[4:offset]
        assert cell[offset + length :] == source[offset + length :]


@given(payload=st.binary(min_size=1, max_size=MAX_CELL_PAYLOAD * 20), seed=seeds)
@settings(max_examples=200, deadline=None)
def test_vector_and_loop_paths_give_identical_bytes(payload: bytes, seed: int) -> None:
    randomness = _randomness(seed, 20)
    vectorised = pack_cells(payload, randomness)
    with mock.patch.object(cells_module, "_VECTOR_THRESHOLD", 10**9):
        looped = pack_cells(payload, randomness)
        assert unpack_cells(vectorised) == payload
    assert vectorised == looped
    assert unpack_cells(looped) == payload


def test_offsets_cover_the_whole_range() -> None:
    seen = {pack_cells(b"x" * 50, os.urandom(64))[0] for _ in range(2000)}
    assert seen == set(range(4, 15))
    seen_short = {pack_cells(b"x", os.urandom(64))[0] for _ in range(4000)}
    assert min(seen_short) == 4 and max(seen_short) == 63


def test_max_record_payload_splits_into_several_records() -> None:
    payload = os.urandom(MAX_RECORD_PAYLOAD * 2 + 1)
    stream = RecordSealer(KEY).seal(payload)
    opener = RecordOpener(KEY)
    assert opener.feed(stream) == [
        payload[:MAX_RECORD_PAYLOAD],
        payload[MAX_RECORD_PAYLOAD:-1],
        payload[-1:],
    ]


@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
@settings(max_examples=200, deadline=None)
def test_any_flipped_bit_is_refused_and_nothing_forged_is_delivered(
    position: int, bit: int
) -> None:
    chunks = [os.urandom(300), os.urandom(5000)]
    stream = bytearray(_sealed_stream(chunks))
    position %= len(stream)
    stream[position] ^= 1 << bit
    opener = RecordOpener(KEY)
    delivered: list[bytes] = []
    with pytest.raises(ChannelError):
        delivered += opener.feed(bytes(stream[: position + 1]))
        delivered += opener.feed(bytes(stream[position + 1 :]))
        opener.check_clean_eof()
    # Only whole, intact records before the damage may have come out.
    assert b"".join(delivered) == b"".join(chunks)[: len(b"".join(delivered))]


def test_replayed_reordered_and_dropped_records_are_refused() -> None:
    sealer = RecordSealer(KEY)
    first, second = sealer.seal(b"first"), sealer.seal(b"second")
    for stream in (first + first, second + first, second):
        with pytest.raises(ChannelError):
            RecordOpener(KEY).feed(stream)


def test_truncation_is_detected_at_eof() -> None:
    stream = _sealed_stream([b"a" * 500], end=False)
    opener = RecordOpener(KEY)
    assert opener.feed(stream) == [b"a" * 500]
    with pytest.raises(ChannelError, match="truncated"):
        opener.check_clean_eof()
    partial = RecordOpener(KEY)
    partial.feed(_sealed_stream([b"b" * 500])[:-30])
    with pytest.raises(ChannelError):
        partial.check_clean_eof()


def test_bytes_after_end_of_stream_are_refused() -> None:
    stream = _sealed_stream([b"x"])
    with pytest.raises(ChannelError):
        RecordOpener(KEY).feed(stream + b"\x00")


def test_wrong_key_is_refused() -> None:
    with pytest.raises(ChannelError):
        RecordOpener(bytes(32)).feed(_sealed_stream([b"x"]))


def test_oversized_count_is_refused_before_reading_the_body() -> None:
    # A valid seal of a count over the limit, as the first record's count would be sealed.
    forged = Aead(KEY).seal(bytes(12), (4000).to_bytes(2, "big"))
    with pytest.raises(ChannelError, match="exceeds"):
        RecordOpener(KEY).feed(forged)


@pytest.mark.parametrize(
    ("index", "value"),
    [(0, 3), (0, 15), (1, 0), (1, 51), (2, 2), (3, 1)],
    ids=["offset-in-header", "offset-too-far", "zero-length", "length-51", "version", "reserved"],
)
def test_malformed_cells_are_refused(index: int, value: int) -> None:
    packed = bytearray(pack_cells(b"y" * 50, os.urandom(64)))
    packed[index] = value
    with pytest.raises(ChannelError):
        unpack_cells(bytes(packed))


def test_short_cell_in_the_middle_is_refused() -> None:
    randomness = os.urandom(64 * 20)
    first, rest = pack_cells(b"a" * 10, randomness[:64]), pack_cells(b"b" * 500, randomness[64:])
    with pytest.raises(ChannelError):
        unpack_cells(bytes(first + rest))


@pytest.mark.parametrize("size", [0, 63, 65])
def test_bodies_that_are_not_whole_cells_are_refused(size: int) -> None:
    with pytest.raises(ChannelError):
        unpack_cells(bytes(size))


@pytest.mark.parametrize("cell", [0, 7, 18])
@pytest.mark.parametrize(("index", "value"), [(0, 3), (0, 15), (1, 49), (2, 2), (3, 1)], ids=str)
def test_malformed_full_cells_are_refused_in_long_records(
    cell: int, index: int, value: int
) -> None:
    """The vectorised check (records of more than a few cells) refuses what the loop does."""
    packed = bytearray(pack_cells(os.urandom(20 * MAX_CELL_PAYLOAD), os.urandom(20 * 64)))
    packed[cell * 64 + index] = value
    with pytest.raises(ChannelError):
        unpack_cells(bytes(packed))


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.binary(max_size=40_000), max_size=6))
def test_sealing_in_parts_is_sealing_the_joined_payload(parts: list[bytes]) -> None:
    """seal_parts_to gathers the parts into its scratch buffer (more than a record's worth
    is joined first): the peer opens exactly the joined bytes, in order."""
    records: list[bytes] = []
    RecordSealer(KEY).seal_parts_to(parts, lambda record: records.append(bytes(record)))
    joined = b"".join(parts)
    assert b"".join(RecordOpener(KEY).feed(b"".join(records))) == joined
    assert len(records) == -(-len(joined) // MAX_RECORD_PAYLOAD)


# One-cell records (every record of a short connection) take a path without the scratch
# buffers on both sides; it must give and accept exactly what the general path does.
ONE_CELL_RECORD = 2 + 16 + CELL_SIZE + 16


@given(payload=st.binary(min_size=1, max_size=MAX_CELL_PAYLOAD), seed=seeds)
@settings(max_examples=100, deadline=None)
def test_one_cell_records_are_sealed_as_the_general_path_would(payload: bytes, seed: int) -> None:
    randomness = _randomness(seed, 1)
    sealed = RecordSealer(KEY, padding=lambda size: randomness[:size]).seal(payload)
    aead = Aead(KEY)
    expected = aead.seal((0).to_bytes(12, "big"), (1).to_bytes(2, "big")) + aead.seal(
        (1).to_bytes(12, "big"), bytes(pack_cells(payload, randomness))
    )
    assert sealed == expected
    assert len(sealed) == ONE_CELL_RECORD
    assert RecordOpener(KEY).feed(sealed) == [payload]


def test_a_read_of_one_cell_record_size_that_is_not_one_is_opened_as_before() -> None:
    # The first bytes of a two-cell record: held until the rest arrives.
    two = RecordSealer(KEY).seal(b"z" * 60)
    opener = RecordOpener(KEY)
    assert opener.feed(two[:ONE_CELL_RECORD]) == []
    assert opener.feed(two[ONE_CELL_RECORD:]) == [b"z" * 60]
    # One-cell records one after the other, each read on its own, then the end.
    sealer = RecordSealer(KEY)
    opener = RecordOpener(KEY)
    for word in (b"a", b"bc", b"d" * 50):
        assert opener.feed(sealer.seal(word)) == [word]
    # The end-of-stream record and bytes after it, in a read of that size: refused.
    end = sealer.seal_end()
    with pytest.raises(ChannelError, match="after the end"):
        opener.feed(end + bytes(ONE_CELL_RECORD - len(end)))


def test_a_forged_one_cell_record_is_refused() -> None:
    sealed = bytearray(RecordSealer(KEY).seal(b"hello"))
    sealed[-1] ^= 1
    with pytest.raises(ChannelError):
        RecordOpener(KEY).feed(bytes(sealed))


def test_one_cell_records_in_parts_are_the_same_bytes() -> None:
    padding = _randomness(7, 2)
    whole = RecordSealer(KEY, padding=lambda size: padding[:size]).seal(b"header" + b"x")
    records: list[bytes] = []
    RecordSealer(KEY, padding=lambda size: padding[:size]).seal_parts_to(
        [b"header", memoryview(b"x")], lambda record: records.append(bytes(record))
    )
    assert records == [whole]
