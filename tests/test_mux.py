"""utils/mux.py: frames round-trip through any split, bad frames are refused, windows hold."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.errors import ProtocolError
from utils.mux import (
    INITIAL_WINDOW,
    MAX_DATA_FRAME,
    OPENING_GRANT,
    STREAM_WINDOW,
    Frame,
    FrameDecoder,
    FrameType,
    ReceiveWindow,
    SendWindow,
    data_frames,
    eof_frame,
    goaway_frame,
    open_frame,
    opening_frames,
    ping_frame,
    window_frame,
    window_increment,
)

frames = st.one_of(
    st.builds(open_frame, st.integers(1, 2**32 - 1), st.binary(min_size=1, max_size=300)),
    st.builds(data_frames, st.integers(1, 2**32 - 1), st.binary(min_size=1, max_size=40000)),
    st.builds(window_frame, st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(eof_frame, st.integers(1, 2**32 - 1)),
    st.builds(ping_frame, st.binary(min_size=8, max_size=8), st.booleans()),
    st.just(goaway_frame()),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, min_size=1, max_size=8), st.data())
def test_frames_survive_any_split(encoded: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(encoded)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = FrameDecoder()
    out: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        out += decoder.feed(wire[start:end])
    assert b"".join(frame.encode() for frame in out) == wire
    assert decoder.pending == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(frames, min_size=1, max_size=8))
def test_merging_keeps_every_byte_and_every_other_frame_in_order(encoded: list[bytes]) -> None:
    decoded = FrameDecoder().feed(b"".join(encoded))
    merged = FrameDecoder().feed(b"".join(encoded), merge_data=True)
    assert len(merged) <= len(decoded)
    assert [f for f in merged if f.type is not FrameType.DATA] == [
        f for f in decoded if f.type is not FrameType.DATA
    ]
    for stream in {f.stream for f in decoded}:
        data = [f.body for f in decoded if f.type is FrameType.DATA and f.stream == stream]
        kept = [f.body for f in merged if f.type is FrameType.DATA and f.stream == stream]
        assert b"".join(kept) == b"".join(data)
    one = FrameDecoder().feed(data_frames(3, bytes(40000)) + eof_frame(3), merge_data=True)
    assert [(f.type, len(f.body)) for f in one] == [(FrameType.DATA, 40000), (FrameType.EOF, 0)]


def test_data_is_split_at_the_frame_limit() -> None:
    decoded = FrameDecoder().feed(data_frames(7, bytes(MAX_DATA_FRAME * 2 + 1)))
    assert [len(f.body) for f in decoded] == [MAX_DATA_FRAME, MAX_DATA_FRAME, 1]
    assert {f.stream for f in decoded} == {7}


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (bytes((0x7F, 0, 0, 0, 1, 0, 0)), "unknown frame type"),
        (Frame(FrameType.PING, 3, bytes(8)).encode(), "PING frame on stream 3"),
        (Frame(FrameType.DATA, 0, b"x").encode(), "DATA frame on stream 0"),
        (Frame(FrameType.EOF, 1, b"x").encode(), "with a body"),
        (Frame(FrameType.WINDOW, 1, b"xy").encode(), "wrong size"),
        (Frame(FrameType.PING, 0, b"x").encode(), "wrong size"),
        (Frame(FrameType.DATA, 1, bytes(MAX_DATA_FRAME + 1)).encode(), "DATA frame of"),
        (Frame(FrameType.OPEN, 1, b"").encode(), "empty OPEN"),
    ],
)
def test_bad_frames_are_refused_from_their_header(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder().feed(wire[:7])  # the header alone is enough to refuse


def test_a_stream_opens_with_its_window_raised_to_the_stream_window() -> None:
    """The protocol starts each direction at INITIAL_WINDOW; the record that opens a stream
    also grants the rest of STREAM_WINDOW, so a bulk stream never waits at 512 KiB."""
    frames = FrameDecoder().feed(opening_frames(5, b"\x01request", b"early"))
    assert [(f.type, f.stream) for f in frames] == [
        (FrameType.OPEN, 5),
        (FrameType.DATA, 5),
        (FrameType.WINDOW, 5),
    ]
    assert window_increment(frames[2]) == OPENING_GRANT == STREAM_WINDOW - INITIAL_WINDOW
    sender = SendWindow()
    sender.grant(window_increment(frames[2]))
    assert sender.take(10 * STREAM_WINDOW) == STREAM_WINDOW
    no_early = FrameDecoder().feed(opening_frames(6, b"\x01request", b""))
    assert [f.type for f in no_early] == [FrameType.OPEN, FrameType.WINDOW]


def test_receive_window_grants_after_half_and_refuses_an_overrun() -> None:
    window = ReceiveWindow(1000)
    window.received(1000)
    with pytest.raises(ProtocolError, match="overran"):
        window.received(1)
    assert window.consumed(499) == 0
    assert window.consumed(1) == 500
    window.received(500)
    with pytest.raises(ProtocolError):
        window.received(1)


def test_send_window_takes_what_is_granted() -> None:
    window = SendWindow(100)
    assert window.take(60) == 60 and window.take(60) == 40 and window.take(1) == 0
    window.grant(10)
    assert window.take(100) == 10
    with pytest.raises(ProtocolError):
        window.grant(2**31)


def test_window_frame_round_trip() -> None:
    (frame,) = FrameDecoder().feed(window_frame(3, INITIAL_WINDOW))
    assert window_increment(frame) == INITIAL_WINDOW
