"""Tests of utils/socks4.py: SOCKS4 / SOCKS4a vectors, errors, and fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from utils.errors import ProtocolError
from utils.socks4 import (
    CMD_BIND,
    CMD_CONNECT,
    Socks4Error,
    Socks4Request,
    build_reply,
    build_request,
    parse_reply,
    parse_request,
)
from utils.socks5 import Address

# curl --socks4 127.0.0.1:1080 http://127.0.0.1:8080/ and --socks4a with localhost
SOCKS4_VECTOR = b"\x04\x01\x1f\x90\x7f\x00\x00\x01\x00"
SOCKS4A_VECTOR = b"\x04\x01\x1f\x90\x00\x00\x00\x01\x00localhost\x00"


def test_socks4_vector() -> None:
    request = Socks4Request(CMD_CONNECT, Address("127.0.0.1", 8080), b"")
    assert parse_request(SOCKS4_VECTOR + b"GET") == (request, len(SOCKS4_VECTOR))
    assert build_request(CMD_CONNECT, Address("127.0.0.1", 8080)) == SOCKS4_VECTOR


def test_socks4a_vector_with_user_id() -> None:
    raw = b"\x04\x02\x00\x50\x00\x00\x00\x07alice\x00example.com\x00"
    request = Socks4Request(CMD_BIND, Address("example.com", 80), b"alice")
    assert parse_request(raw) == (request, len(raw))
    assert parse_request(SOCKS4A_VECTOR) == (
        Socks4Request(CMD_CONNECT, Address("localhost", 8080), b""),
        len(SOCKS4A_VECTOR),
    )


@pytest.mark.parametrize("vector", [SOCKS4_VECTOR, SOCKS4A_VECTOR])
def test_every_prefix_needs_more(vector: bytes) -> None:
    for end in range(len(vector)):
        assert parse_request(vector[:end]) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x05\x01\x00\x50\x7f\x00\x00\x01\x00", "version 5"),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 256, "user id longer"),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * 256, "host name longer"),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", "without a host name"),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00bad host\x00", "not a valid name"),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\xff\x00", "not a valid name"),
    ],
)
def test_bad_requests_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(Socks4Error, match=message):
        parse_request(raw)


def test_replies() -> None:
    assert build_reply(granted=False) == b"\x00\x5b" + bytes(6)
    granted = build_reply(granted=True, bind=Address("10.1.2.3", 4660))
    assert granted == b"\x00\x5a\x12\x34\x0a\x01\x02\x03"
    assert parse_reply(granted) == (True, Address("10.1.2.3", 4660))
    assert build_reply(granted=True, bind=Address("::1", 80)) == b"\x00\x5a" + bytes(6)
    assert parse_reply(granted[:7]) is None


@given(st.ip_addresses(v=4), st.integers(0, 65535), st.binary(max_size=255).filter(
    lambda b: b"\x00" not in b))  # fmt: skip
def test_round_trip_ipv4(ip: object, port: int, user: bytes) -> None:
    address = Address(str(ip), port)
    raw = build_request(CMD_CONNECT, address, user)
    if raw[4:7] == b"\x00\x00\x00" and raw[7] != 0:
        return  # 0.0.0.x is SOCKS4a's marker, not an address a client can ask for
    assert parse_request(raw + b"tail") == (Socks4Request(CMD_CONNECT, address, user), len(raw))


@given(st.binary(max_size=600))
def test_fuzz_never_crashes(data: bytes) -> None:
    """Arbitrary bytes: a request, a wait for more, or a Socks4Error; nothing else."""
    try:
        parsed = parse_request(data)
    except ProtocolError as exc:
        assert isinstance(exc, Socks4Error)
        return
    if parsed is not None:
        assert 0 < parsed[1] <= len(data)


@given(st.binary(max_size=600), st.integers(1, 40))
def test_fuzz_split_does_not_matter(data: bytes, step: int) -> None:
    """Parsing a growing buffer gives the same answer as parsing it whole."""
    data = b"\x04" + data
    try:
        whole = parse_request(data)
    except Socks4Error:
        return
    for end in range(0, len(data), step):
        partial = parse_request(data[:end])
        assert partial is None or partial == whole
