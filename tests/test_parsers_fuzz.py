"""Property fuzzing of the sans-IO parsers the other test files do not fuzz yet.

Already covered elsewhere: the SOCKS5 state machine and address/request/reply decoders
(tests/test_socks5.py), single bit flips in handshakes (tests/test_handshake.py) and record
streams (tests/test_cells.py), parse_head on bytes ending in a blank line and the channel
datagram decoder (tests/test_httpconnect_udp.py). Here: arbitrary and structured bytes
into the handshake state machines and their message reader, the record opener and the
cell decoder, the SOCKS5 UDP header and HTTP CONNECT heads built from parts. The contract
is the one the handlers rely on: peer bytes raise only the errors they catch on purpose
(a SockproxyError; the narrower class named in each test), never anything else, and the
server never spends an RSA private-key operation on bytes it cannot authenticate.
"""

from __future__ import annotations

import base64
import os

import pytest
from Crypto.PublicKey.RSA import RsaKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utils.handshake as hs
from tests.vectors import vector_key
from utils.cells import CELL_SIZE, MAX_CELL_PAYLOAD, RecordOpener, RecordSealer, unpack_cells
from utils.errors import ChannelError, ProtocolError, SockproxyError, Socks5Error
from utils.httpconnect import MAX_HEAD_SIZE, HttpProxyError, parse_head
from utils.udp import parse_socks_datagram

KEY = bytes(range(32))
TICKET_ID = b"T" * hs.TICKET_ID_SIZE
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def local_key() -> RsaKey:
    return vector_key("local")


@pytest.fixture(scope="module")
def server_key() -> RsaKey:
    return vector_key("server")


def _responder(local_key: RsaKey, server_key: RsaKey) -> hs.ServerHandshake:
    """A server that knows the local's key and one resumption ticket."""
    store = hs.TicketStore(3600)
    store.add(TICKET_ID, b"s" * 32, hs.key_fingerprint(local_key))
    peers = {hs.key_fingerprint(local_key): hs.AuthorizedPeer("alice", local_key.public_key())}
    responder = hs.ServerHandshake(server_key, peers, store)
    responder.start()
    return responder


def _feed_server(responder: hs.ServerHandshake, chunks: list[bytes]) -> None:
    """Feed the chunks; only on-purpose errors may come out, and no private-key work."""
    before = hs.PRIVATE_KEY_OPERATIONS.value
    try:
        for chunk in chunks:
            assert responder.receive(chunk) == b""  # nothing here can earn an answer
    except SockproxyError:
        pass
    assert hs.PRIVATE_KEY_OPERATIONS.value == before
    assert responder.keys is None


# --------------------------------------------------------------------------- handshakes


@FUZZ
@given(st.lists(st.binary(max_size=700), max_size=6))
def test_server_handshake_takes_any_bytes(
    local_key: RsaKey, server_key: RsaKey, chunks: list[bytes]
) -> None:
    _feed_server(_responder(local_key, server_key), chunks)


def _body(draw: st.DrawFn, message_type: int, fingerprint: bytes) -> bytes:
    """A body of the right size for its type most of the time, with the right names in it."""
    sizes = {
        hs.CLIENT_HELLO: hs.RANDOM_SIZE + hs.FINGERPRINT_SIZE + 256,
        hs.CLIENT_SIGNATURE: 256,
        hs.RESUME_HELLO: hs.TICKET_ID_SIZE + hs.RANDOM_SIZE + hs.SHARE_SIZE,
        hs.CLIENT_FINISHED: hs.MAC_SIZE,
    }
    size = sizes.get(message_type, 33)
    if draw(st.integers(0, 4)) == 0:
        size = draw(st.integers(0, 300))
    body = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if message_type == hs.CLIENT_HELLO and len(body) >= 64 and draw(st.booleans()):
        body[hs.RANDOM_SIZE : hs.RANDOM_SIZE + hs.FINGERPRINT_SIZE] = fingerprint
    if message_type == hs.RESUME_HELLO and len(body) >= 16 and draw(st.booleans()):
        body[: hs.TICKET_ID_SIZE] = TICKET_ID
    return bytes(body)


@st.composite
def client_flights(draw: st.DrawFn, fingerprint: bytes) -> list[bytes]:
    """Two framed messages of plausible types and sizes, cut into random chunks."""
    types = st.sampled_from([hs.CLIENT_HELLO, hs.CLIENT_SIGNATURE, hs.RESUME_HELLO,
                             hs.CLIENT_FINISHED, hs.SERVER_HELLO, 0, 0x0A, 0xFF])  # fmt: skip
    wire = b"".join(hs.frame(t, _body(draw, t, fingerprint)) for t in (draw(types), draw(types)))
    wire += draw(st.binary(max_size=100))  # what may follow: records, junk
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=4)))
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]


@FUZZ
@given(st.data())
def test_server_handshake_takes_plausible_messages(
    local_key: RsaKey, server_key: RsaKey, data: st.DataObject
) -> None:
    """Right types, sizes, fingerprint and ticket id: the checks behind them still hold."""
    chunks = data.draw(client_flights(hs.key_fingerprint(local_key)))
    _feed_server(_responder(local_key, server_key), chunks)


@st.composite
def server_flights(draw: st.DrawFn) -> list[bytes]:
    """A valid ServerHello half of the time, then plausible or random server messages."""
    size = hs.SERVER_HELLO_SIZE - 1
    hello = hs.frame(hs.SERVER_HELLO, b"\x01" + draw(st.binary(min_size=size, max_size=size)))
    start = hello if draw(st.booleans()) else draw(st.binary(max_size=70))
    types = st.sampled_from([hs.SERVER_KEY, hs.SERVER_SIGNATURE, hs.SERVER_FINISHED,
                             hs.SERVER_HELLO, 0x09, 0xFF])  # fmt: skip
    sizes = st.sampled_from([32, 64, 256, 288, 0, 5])
    rest = b"".join(
        hs.frame(draw(types), draw(st.binary(min_size=size, max_size=size)))
        for size in (draw(sizes), draw(sizes))
    )
    return [start, rest + draw(st.binary(max_size=50))]


@settings(FUZZ, max_examples=40)  # the local signs once per valid ServerHello: ~5 ms
@given(server_flights(), st.booleans())
def test_client_handshake_takes_any_server_bytes(
    local_key: RsaKey, server_key: RsaKey, chunks: list[bytes], resume: bool
) -> None:
    ticket = hs.Ticket(TICKET_ID, b"s" * 32, float("inf")) if resume else None
    client = hs.ClientHandshake(local_key, server_key.public_key(), ticket)
    try:
        for chunk in chunks:
            client.receive(chunk)
    except SockproxyError:
        pass
    assert not client.done  # (keys come before ServerFinished when resuming; trust does not)


@given(st.lists(st.binary(max_size=5000), max_size=4), st.integers(1, 3))
def test_message_reader_takes_any_bytes(chunks: list[bytes], count: int) -> None:
    reader = hs.MessageReader()
    try:
        for chunk in chunks:
            reader.feed(chunk)
            messages = reader.take(count)
            if messages is not None:
                assert len(messages) == count
                for message in messages:
                    assert 1 <= len(message.wire) - 2 <= hs.MAX_MESSAGE_SIZE
    except ProtocolError:
        pass


# --------------------------------------------------------------------------- records and cells


@given(st.lists(st.binary(max_size=3000), max_size=5))
def test_record_opener_never_returns_unauthenticated_bytes(chunks: list[bytes]) -> None:
    opener = RecordOpener(KEY)
    with pytest.raises(ChannelError):
        for chunk in chunks:
            assert opener.feed(chunk) == []  # no forged record opens
        opener.check_clean_eof()  # and the stream never ended cleanly either


@given(st.binary(max_size=2000), st.binary(max_size=200))
def test_record_opener_after_a_genuine_record(payload: bytes, junk: bytes) -> None:
    """Genuine records come out whole; whatever follows them is refused or held back."""
    sealed = RecordSealer(KEY).seal(payload) if payload else b""
    opener = RecordOpener(KEY)
    out = opener.feed(sealed)
    assert b"".join(out) == payload
    try:
        assert opener.feed(junk) == []
        opener.check_clean_eof()
    except ChannelError:
        return
    pytest.fail("random bytes after a record passed as a clean end of stream")


@st.composite
def cell_bodies(draw: st.DrawFn) -> bytes:
    """Whole numbers of cells whose headers are near-valid, or any bytes at all."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=700))
    cells = []
    for _ in range(draw(st.integers(1, 12))):
        header = bytes(
            [
                draw(st.sampled_from([0, 3, 4, 5, 14, 60, 63, 64, 255])),
                draw(st.sampled_from([0, 1, 49, 50, 51, 60, 255])),
                draw(st.sampled_from([1, 1, 1, 0, 2])),
                draw(st.sampled_from([0, 0, 0, 1])),
            ]
        )
        cells.append(header + draw(st.binary(min_size=60, max_size=60)))
    return b"".join(cells)


@given(cell_bodies())
def test_unpack_cells_takes_any_bytes(body: bytes) -> None:
    try:
        payload = unpack_cells(body)
    except ChannelError:
        return
    count = len(body) // CELL_SIZE
    assert MAX_CELL_PAYLOAD * (count - 1) < len(payload) <= MAX_CELL_PAYLOAD * count


# --------------------------------------------------------------------------- SOCKS5 UDP header


@given(st.binary(max_size=300))
def test_socks_datagram_header_only_raises_socks5_error(data: bytes) -> None:
    """The local drops a bad datagram by catching Socks5Error: nothing else may escape."""
    try:
        parse_socks_datagram(data)
    except Socks5Error:
        pass


@given(st.sampled_from([1, 3, 4]), st.binary(max_size=300))
def test_socks_datagram_with_a_plausible_header(atyp: int, rest: bytes) -> None:
    try:
        address, payload = parse_socks_datagram(b"\x00\x00\x00" + bytes([atyp]) + rest)
    except Socks5Error:
        return
    assert rest.endswith(payload)
    assert 0 <= address.port <= 0xFFFF


# --------------------------------------------------------------------------- HTTP CONNECT heads

_text = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)


@st.composite
def connect_heads(draw: st.DrawFn) -> bytes:
    """CONNECT heads built from parts, each part valid or not."""
    method = draw(st.sampled_from(["CONNECT", "GET", "connect", ""]) | _text)
    host = draw(st.sampled_from(["127.0.0.1", "[::1]", "localhost", "[::1", "a..b", ""]) | _text)
    port = draw(st.sampled_from(["80", "0", "65535", "65536", "²", "-1", ""]) | _text)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", ""]) | _text)
    line = f"{method} {host}:{port} {version}" if draw(st.integers(0, 4)) else draw(_text)
    headers = []
    for _ in range(draw(st.integers(0, 3))):
        raw = draw(st.binary(max_size=30))
        token = draw(
            st.sampled_from(
                [base64.b64encode(raw).decode(), base64.b64encode(raw).decode()[:-1], "!!"]
            )
        )
        name = draw(st.sampled_from(["Proxy-Authorization", "proxy-authorization ", "Host"]))
        scheme = draw(st.sampled_from(["Basic", "basic", "Bearer", ""]))
        headers.append(draw(st.sampled_from([f"{name}: {scheme} {token}", f"{name}:"]) | _text))
    head = "\r\n".join([line, *headers]).encode("latin-1")
    return head + draw(st.sampled_from([b"\r\n\r\n", b"\r\n\r\nrest", b"\r\n", b""]))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(connect_heads())
def test_connect_heads_parse_or_refuse_cleanly(head: bytes) -> None:
    try:
        parsed = parse_head(head)
    except HttpProxyError as exc:
        assert 400 <= exc.status < 500
        return
    if parsed is None:
        assert b"\r\n\r\n" not in head
        return
    request, used = parsed
    assert head[:used].endswith(b"\r\n\r\n")
    assert 0 <= request.address.port <= 0xFFFF


def test_an_endless_head_is_refused_once_too_large() -> None:
    junk = os.urandom(MAX_HEAD_SIZE + 1).replace(b"\r", b"r")
    with pytest.raises(HttpProxyError) as refused:
        parse_head(junk)
    assert refused.value.status == 431
    assert parse_head(junk[:MAX_HEAD_SIZE]) is None
