"""HTTP CONNECT parsing and UDP ASSOCIATE datagrams, with exact bytes."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.errors import ProtocolError, Socks5Error
from utils.httpconnect import (
    HttpProxyError,
    looks_like_http,
    parse_head,
    response,
    response_for_reply,
)
from utils.socks5 import Address, Reply
from utils.udp import (
    DatagramDecoder,
    build_socks_datagram,
    encode_channel_datagram,
    parse_socks_datagram,
    plain_ip,
)


def test_connect_head_is_parsed_and_the_rest_kept() -> None:
    head = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    parsed = parse_head(head + b"\x16\x03\x01")
    assert parsed is not None
    request, used = parsed
    assert request.address == Address("example.com", 443)
    assert request.credentials is None
    assert used == len(head)


def test_ipv6_authority_and_basic_credentials() -> None:
    token = base64.b64encode(b"alice:pa:ss").decode()
    head = f"CONNECT [::1]:8080 HTTP/1.1\r\nproxy-authorization: Basic {token}\r\n\r\n"
    parsed = parse_head(head.encode())
    assert parsed is not None
    assert parsed[0].address == Address("::1", 8080)
    assert parsed[0].credentials == (b"alice", b"pa:ss")


def test_incomplete_head_waits() -> None:
    assert parse_head(b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n") is None


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 405),
        (b"CONNECT example.com HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT example.com:http HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a:1 SPDY/3\r\n\r\n", 400),
        (b"CONNECT :443 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a:99999 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\nX: " + b"y" * 20000, 431),
    ],
)
def test_bad_heads_get_their_status(head: bytes, status: int) -> None:
    with pytest.raises(HttpProxyError) as caught:
        parse_head(head)
    assert caught.value.status == status


def test_responses() -> None:
    assert response_for_reply(Reply.SUCCEEDED) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert response_for_reply(Reply.CONNECTION_REFUSED).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert response_for_reply(Reply.NOT_ALLOWED).startswith(b"HTTP/1.1 403 ")
    assert response_for_reply(Reply.TTL_EXPIRED).startswith(b"HTTP/1.1 504 ")
    challenge = response(407, "Proxy Authentication Required", ask_for_auth=True)
    assert b'Proxy-Authenticate: Basic realm="sockproxy"\r\n' in challenge


def test_first_byte_tells_socks_from_http() -> None:
    assert looks_like_http(ord("C")) and not looks_like_http(5)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_any_head_is_parsed_or_refused_cleanly(data: bytes) -> None:
    try:
        parse_head(data + b"\r\n\r\n")
    except ProtocolError:
        pass


# --------------------------------------------------------------------------- UDP


def test_socks_datagram_bytes() -> None:
    datagram = build_socks_datagram(Address("127.0.0.1", 53), b"q")
    assert datagram == b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35q"
    assert parse_socks_datagram(datagram) == (Address("127.0.0.1", 53), b"q")
    named = b"\x00\x00\x00\x03\x07example\x01\xbbdata"
    assert parse_socks_datagram(named) == (Address("example", 443), b"data")


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"\x00\x00",
        b"\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x35",
        b"\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x35x",
    ],
    ids=["empty", "short", "reserved", "fragment"],
)
def test_bad_socks_datagrams_are_refused(datagram: bytes) -> None:
    with pytest.raises(Socks5Error):
        parse_socks_datagram(datagram)


def test_channel_datagram_framing_round_trip_on_any_split() -> None:
    items = [
        (Address("::1", 7), b""),
        (Address("a.test", 9), b"x" * 5000),
        (Address("1.2.3.4", 1), b"y"),
    ]
    stream = b"".join(encode_channel_datagram(a, p) for a, p in items)
    assert (
        encode_channel_datagram(Address("1.2.3.4", 1), b"y")
        == b"\x00\x08\x01\x01\x02\x03\x04\x00\x01y"
    )
    for cut in range(0, len(stream), 97):
        decoder = DatagramDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == items


def test_oversized_datagram_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_channel_datagram(Address("1.2.3.4", 1), bytes(65535))


@given(st.binary(max_size=200))
def test_decoder_never_raises_anything_but_protocol_errors(data: bytes) -> None:
    try:
        DatagramDecoder().feed(data)
    except ProtocolError:
        pass


def test_plain_ip_unmaps() -> None:
    assert plain_ip("::ffff:127.0.0.1") == "127.0.0.1"
    assert plain_ip("::1") == "::1"
    assert plain_ip("fe80::1%eth0") == "fe80::1"
