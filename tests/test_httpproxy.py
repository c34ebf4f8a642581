"""Tests of utils/httpproxy.py: absolute-URI requests, response heads, body framing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from utils.errors import ProtocolError
from utils.httpconnect import HttpProxyError
from utils.httpproxy import (
    NO_BODY,
    Body,
    BodyReader,
    Framing,
    error_response,
    is_connect,
    parse_request,
    parse_response,
)
from utils.socks5 import Address

CURL_GET = (
    b"GET http://127.0.0.1:8080/small.bin?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"User-Agent: curl/7.88.1\r\nAccept: */*\r\nProxy-Connection: Keep-Alive\r\n\r\n"
)


def test_curl_get_becomes_origin_form() -> None:
    request, used = parse_request(CURL_GET + b"next") or pytest.fail("incomplete")
    assert used == len(CURL_GET)
    assert request.origin == Address("127.0.0.1", 8080)
    assert request.head == (
        b"GET /small.bin?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    )
    assert (request.method, request.body, request.keep_alive) == ("GET", NO_BODY, True)
    assert request.credentials is None


def test_every_prefix_needs_more() -> None:
    for end in range(len(CURL_GET)):
        assert parse_request(CURL_GET[:end]) is None


@pytest.mark.parametrize(
    ("target", "origin", "host", "path"),
    [
        ("http://example.com", Address("example.com", 80), "example.com", "/"),
        ("http://EXAMPLE.com:81?q", Address("example.com", 81), "EXAMPLE.com:81", "/?q"),
        ("http://[::1]:8080/a", Address("::1", 8080), "[::1]:8080", "/a"),
        ("HTTP://[::1]/", Address("::1", 80), "[::1]", "/"),
    ],
)
def test_targets(target: str, origin: Address, host: str, path: str) -> None:
    raw = f"PUT {target} HTTP/1.0\r\nContent-Length: 3\r\n\r\n".encode()
    request, _ = parse_request(raw) or pytest.fail("incomplete")
    assert request.origin == origin
    assert (
        request.head == f"PUT {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 3\r\n\r\n".encode()
    )
    assert request.body == Body(Framing.LENGTH, 3)
    assert not request.keep_alive  # HTTP/1.0 without keep-alive


def test_hop_by_hop_and_credentials() -> None:
    raw = (
        b"POST http://h/ HTTP/1.1\r\nConnection: X-A, close\r\nX-A: 1\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic Ym9iOnB3\r\nUpgrade: h2c\r\nTrailer: X\r\n"
        b"Transfer-Encoding: chunked\r\nX-B: 2\r\n\r\n"
    )
    request, _ = parse_request(raw) or pytest.fail("incomplete")
    assert request.head == (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-B: 2\r\n\r\n"
    )
    assert request.credentials == (b"bob", b"pw")
    assert request.body == Body(Framing.CHUNKED)
    assert not request.keep_alive


@pytest.mark.parametrize(
    ("raw", "status", "advice"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400, "this is a proxy"),
        (b"GET https://h/ HTTP/1.1\r\n\r\n", 400, "CONNECT"),
        (b"GET ftp://h/ HTTP/1.1\r\n\r\n", 400, "only http://.*not ftp://"),
        (b"GET a\x1bb://h/ HTTP/1.1\r\n\r\n", 400, "not other schemes"),
        (b"GET http://h/ HTTP/1.1\r\nProxy-Authorization : Basic c2VjcmV0\r\n\r\n", 400,
         "^malformed header line$"),
        (b"GET http://u@h/ HTTP/1.1\r\n\r\n", 400, "no user name"),
        (b"GET http://h:99999/ HTTP/1.1\r\n\r\n", 400, "host or port"),
        (b"GET http://h/ HTTP/2\r\n\r\n", 400, "request line"),
        (b"GET http://h/ HTTP/1.1\r\nbad\r\n\r\n", 400, "header line"),
        (b"GET http://h/ HTTP/1.1\r\n folded\r\n\r\n", 400, "header line"),
        (b"POST http://h/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
         "Content-Length"),
        (b"POST http://h/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
         400, "both"),
        (b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "chunked"),
        (b"GET http://h/ HTTP/1.1\r\nX: " + b"a" * 20000, 431, "too large"),
        (b"GET http://h/ HTTP/1.1\r\nX: a\nContent-Length: 5\r\n\r\n", 400, "bare CR, LF"),
        (b"GET http://h/ HTTP/1.1\r\nX: a\rY: b\r\n\r\n", 400, "bare CR, LF"),
        (b"GET http://h/ HTTP/1.1\r\nX: a\x00\r\n\r\n", 400, "NUL"),
    ],
)  # fmt: skip
def test_refusals_say_what_to_do(raw: bytes, status: int, advice: str) -> None:
    with pytest.raises(HttpProxyError, match=advice) as caught:
        parse_request(raw)
    assert caught.value.status == status


def test_is_connect() -> None:
    assert is_connect(b"CONNECT h:443 HTTP/1.1\r\n\r\n")
    assert not is_connect(CURL_GET)


@pytest.mark.parametrize(
    ("raw", "method", "status", "body", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET", 200, Body(Framing.LENGTH, 5),
         True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD", 200, NO_BODY, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", 200,
         Body(Framing.CHUNKED), True),
        (b"HTTP/1.1 200 OK\r\n\r\n", "GET", 200, Body(Framing.UNTIL_CLOSE), False),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET", 304, NO_BODY, True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", 204, NO_BODY, True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "POST", 100, NO_BODY, True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", 200, NO_BODY, False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", "GET", 200,
         NO_BODY, True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", "GET", 200,
         Body(Framing.LENGTH, 1), False),
    ],
)  # fmt: skip
def test_response_heads(raw: bytes, method: str, status: int, body: Body, keep_alive: bool) -> None:
    head, used = parse_response(raw + b"body", method) or pytest.fail("incomplete")
    assert used == len(raw)
    assert (head.status, head.body, head.keep_alive) == (status, body, keep_alive)
    assert head.interim == (status == 100)


@pytest.mark.parametrize("raw", [b"SSH-2.0-x\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n"])
def test_bad_response_heads(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_response(raw, "GET")


def test_error_response() -> None:
    answer = error_response(502, "Bad Gateway", "h:80 refused the connection")
    assert answer == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 28\r\nConnection: close\r\n\r\nh:80 refused the connection\n"
    )
    assert b"Proxy-Authenticate: Basic" in error_response(407, "x", "y", ask_for_auth=True)


# --------------------------------------------------------------------------- bodies


def chunked(parts: list[bytes], trailers: list[bytes]) -> bytes:
    out = b"".join(b"%x;ext=1\r\n" % len(p) + p + b"\r\n" for p in parts if p)
    return out + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


def feed_in_pieces(reader: BodyReader, data: bytes, cuts: list[int]) -> tuple[bytes, bytes]:
    body, rest = b"", b""
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        part, after = reader.feed(data[start:end])
        body += part
        rest += after
    return body, rest


@given(
    st.lists(st.binary(max_size=300), max_size=6),
    st.lists(st.sampled_from([b"X-T: 1", b"Y: 2"]), max_size=2),
    st.binary(max_size=50),
    st.lists(st.integers(0, 2000), max_size=12),
)
def test_chunked_end_is_found_however_split(
    parts: list[bytes], trailers: list[bytes], after: bytes, cuts: list[int]
) -> None:
    message = chunked(parts, trailers)
    reader = BodyReader(Body(Framing.CHUNKED))
    body, rest = feed_in_pieces(reader, message + after, cuts)
    assert reader.done
    assert (body, rest) == (message, after)


@given(st.binary(max_size=500), st.integers(0, 500), st.lists(st.integers(0, 600), max_size=8))
def test_length_end_is_found_however_split(data: bytes, length: int, cuts: list[int]) -> None:
    reader = BodyReader(Body(Framing.LENGTH, length))
    body, rest = feed_in_pieces(reader, data, cuts)
    assert (body, rest) == (data[:length], data[length:])
    assert reader.done == (len(data) >= length)


def test_cut_off_bodies() -> None:
    reader = BodyReader(Body(Framing.LENGTH, 10))
    reader.feed(b"12345")
    with pytest.raises(ProtocolError, match="cut off"):
        reader.feed_eof()
    until_close = BodyReader(Body(Framing.UNTIL_CLOSE))
    assert until_close.feed(b"abc") == (b"abc", b"")
    until_close.feed_eof()
    assert until_close.done


@pytest.mark.parametrize(
    "raw", [b"zz\r\n", b"5\r\nabcdeXX\r\n", b"1" * 20 + b"\r\n", b"5" + b" " * 9000]
)
def test_bad_chunked_bodies(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        BodyReader(Body(Framing.CHUNKED)).feed(raw)


@given(st.binary(max_size=400))
def test_fuzz_request_parser(data: bytes) -> None:
    """Arbitrary bytes after a request line: a request, a wait, or an HttpProxyError."""
    raw = b"GET http://h/ HTTP/1.1\r\n" + data
    try:
        parsed = parse_request(raw)
    except HttpProxyError:
        return
    if parsed is not None:
        assert parsed[0].head.endswith(b"\r\n\r\n")


@given(st.binary(max_size=400))
def test_fuzz_chunked_reader(data: bytes) -> None:
    reader = BodyReader(Body(Framing.CHUNKED))
    try:
        body, rest = reader.feed(data)
    except ProtocolError:
        return
    assert body + rest == data


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_fuzz_any_bytes(head: bytes, tail: bytes) -> None:
    """Any bytes at all: a request, a wait for more, or an HttpProxyError; responses alike."""
    data = head + b"\r\n\r\n" + tail
    try:
        parse_request(data)
    except HttpProxyError:
        pass
    try:
        parse_response(data, "GET")
    except ProtocolError:
        pass
