"""Property fuzzing of the sans-IO parsers the other test files do not fuzz yet.

Already covered elsewhere: the SOCKS5 state machine and address/request/reply decoders
(tests/test_socks5.py), single bit flips in handshakes (tests/test_handshake.py) and record
streams (tests/test_cells.py), parse_head on bytes ending in a blank line and the channel
datagram decoder (tests/test_httpconnect_udp.py). Here (protocol v2): arbitrary, mutated
and validly sealed but malformed ClientInits into the server's handshake, arbitrary and
sealed ServerResponses into the local's, the message decoders, the mux FrameDecoder, the
record opener and the cell decoder, the SOCKS5 UDP header and HTTP CONNECT heads built from
parts. The contract is the one the handlers rely on: peer bytes raise only the errors they
catch on purpose (a SockproxyError; the narrower class named in each test), never anything
else, and the server never spends an RSA private-key operation on bytes that do not
authenticate.
"""

from __future__ import annotations

import base64
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utils.handshake as hs
from tests.conftest import Keys
from utils.cells import CELL_SIZE, MAX_CELL_PAYLOAD, RecordOpener, RecordSealer, unpack_cells
from utils.crypto import Ephemeral, RsaKey, rsa_sign
from utils.errors import ChannelError, ProtocolError, SockproxyError, Socks5Error
from utils.httpconnect import MAX_HEAD_SIZE, HttpProxyError, parse_head
from utils.keys import fingerprint_bytes, load_private_key
from utils.mux import (
    HEADER_SIZE,
    MAX_DATA_FRAME,
    SESSION_FRAMES,
    Frame,
    FrameDecoder,
    FrameType,
)
from utils.udp import parse_socks_datagram

KEY = bytes(range(32))
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Parties:
    """A local and a server that knows it, and a count of the server's private-key work."""

    def __init__(self, local: RsaKey, server: RsaKey) -> None:
        self.local = local
        self.server_key = server
        self.signatures = 0
        self.secret = hs.server_secret(server, self._sign)
        self.public = hs.ServerPublic(server.public_key(), self.secret.static.share)
        fingerprint = fingerprint_bytes(local)
        self.fingerprint = fingerprint
        self.peers = {fingerprint: hs.AuthorizedPeer("alice", local.public_key())}
        self.genuine = hs.ClientHandshake(local, self.public).create_client_init(b"early")

    def _sign(self, message: bytes) -> bytes:
        self.signatures += 1
        return rsa_sign(self.server_key, message)

    def responder(self) -> hs.ServerHandshake:
        return hs.ServerHandshake(self.secret, self.peers)


@pytest.fixture(scope="module")
def parties(keys: Keys) -> Parties:
    def key(name: str) -> RsaKey:
        return load_private_key(Path(keys.path(name)))

    return Parties(key("local_private"), key("server_private"))


def _feed_server(parties: Parties, chunks: list[bytes]) -> hs.ClientInit | None:
    """Feed the chunks; only on-purpose errors may come out, and no private-key work."""
    before = parties.signatures
    responder = parties.responder()
    found = None
    try:
        for chunk in chunks:
            found = responder.consume_client_init(chunk) or found
    except SockproxyError:
        pass
    assert parties.signatures == before
    assert responder.keys is None
    return found


def _chunks(draw: Callable[[Any], Any], wire: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=4)))
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]


# --------------------------------------------------------------------------- the ClientInit


@FUZZ
@given(st.lists(st.binary(max_size=700), max_size=6))
def test_client_init_parser_takes_any_bytes(parties: Parties, chunks: list[bytes]) -> None:
    assert _feed_server(parties, chunks) is None


@st.composite
def mutated_inits(draw: st.DrawFn, genuine: bytes) -> tuple[bytes, list[bytes]]:
    """A genuine ClientInit with bits flipped, bytes cut, inserted or replaced."""
    wire = bytearray(genuine)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        position = draw(st.integers(0, max(len(wire) - 1, 0)))
        if kind == "flip" and wire:
            wire[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del wire[position:]
        elif kind == "insert":
            wire[position:position] = draw(st.binary(min_size=1, max_size=40))
        else:
            patch = draw(st.binary(min_size=1, max_size=40))
            wire[position : position + len(patch)] = patch
    changed = bytes(wire) + draw(st.binary(max_size=60))
    return changed, _chunks(draw, changed)


@FUZZ
@given(st.data())
def test_mutated_client_inits_never_authenticate(parties: Parties, data: st.DataObject) -> None:
    changed, chunks = data.draw(mutated_inits(parties.genuine))
    found = _feed_server(parties, chunks)
    if found is not None:  # only if the mutations left the ClientInit itself intact
        assert changed.startswith(parties.genuine)


def seal_client_init(static_share: bytes, header: bytes, body: bytes, rng: bytes) -> bytes:
    """A ClientInit with any header and body plaintext, sealed as a local would seal it
    (utils.handshake's own key schedule): the parsers behind the AEAD get fuzzed."""
    random, ephemeral = rng[: hs.RANDOM_SIZE], Ephemeral(private=rng[hs.RANDOM_SIZE :])
    masked = hs._xor(ephemeral.share, hs.mask_for(static_share, random))
    keys = hs._init_keys(ephemeral.agree(static_share), static_share, random, ephemeral.share)
    prefix = random + masked
    return b"".join(
        (
            prefix,
            keys.init.seal(hs.HEADER_NONCE, header, prefix),
            keys.init.seal(hs.BODY_NONCE, body),
        )
    )


@st.composite
def sealed_inits(draw: st.DrawFn, fingerprint: bytes) -> tuple[bytes, bytes]:
    """(header, body) plaintexts: plausible or not, the right fingerprint or not."""
    signature = draw(st.binary(max_size=300) | st.binary(min_size=256, max_size=256))
    early = draw(st.binary(max_size=200))
    if draw(st.booleans()):
        who = fingerprint if draw(st.booleans()) else draw(st.binary(min_size=32, max_size=32))
        body = b"".join(
            (who, struct.pack(">H", len(signature)), signature, struct.pack(">H", len(early)))
        )
        body += early + draw(st.binary(max_size=40))
        if draw(st.integers(0, 4)) == 0:  # a length field that lies
            body = body[:32] + draw(st.binary(min_size=2, max_size=2)) + body[34:]
    else:
        body = draw(st.binary(max_size=400))
    length = len(body) + 16 if draw(st.booleans()) else draw(st.integers(0, 0xFFFF))
    timestamp = draw(st.integers(0, 2**64 - 1))
    return struct.pack(">QH", timestamp, length), body


@FUZZ
@given(st.data(), st.binary(min_size=64, max_size=64))
def test_sealed_client_inits_with_any_plaintext_fail_cleanly(
    parties: Parties, data: st.DataObject, rng: bytes
) -> None:
    """Past the AEAD: header and body decoders, the key lookup and the signature check."""
    header, body = data.draw(sealed_inits(parties.fingerprint))
    wire = seal_client_init(parties.secret.static.share, header, body, rng)
    wire += data.draw(st.binary(max_size=60))
    assert _feed_server(parties, _chunks(data.draw, wire)) is None


def test_the_sealing_helper_reaches_the_checks_behind_the_aead(parties: Parties) -> None:
    """So the fuzzing above is not stuck at the AEAD: a well-formed body with the right
    fingerprint gets as far as the signature; another fingerprint, as far as the key list."""
    signature, early = os.urandom(256), b""
    for who, error in ((parties.fingerprint, "signature does not verify"), (bytes(32), "unknown")):
        body = who + struct.pack(">H", 256) + signature + struct.pack(">H", 0) + early
        header = struct.pack(">QH", int(time.time() * 1000), len(body) + 16)
        wire = seal_client_init(parties.secret.static.share, header, body, os.urandom(64))
        with pytest.raises(SockproxyError, match=error):
            parties.responder().consume_client_init(wire)


@given(st.binary(min_size=10, max_size=10), st.binary(max_size=600), st.binary(max_size=600))
def test_message_decoders_raise_only_protocol_errors(
    header: bytes, body: bytes, response: bytes
) -> None:
    for decode, data in (
        (hs.InitHeader.decode, header),
        (hs.InitBody.decode, body),
        (hs.ResponseBody.decode, response),
    ):
        try:
            decoded = decode(data)
        except ProtocolError:
            continue
        assert decoded is not None


# --------------------------------------------------------------------------- the ServerResponse


@settings(FUZZ, max_examples=50)  # the local signs once per ClientInit: ~3 ms
@given(st.data())
def test_server_response_parser_takes_any_bytes(parties: Parties, data: st.DataObject) -> None:
    client = hs.ClientHandshake(parties.local, parties.public)
    client.create_client_init()
    chunks = data.draw(st.lists(st.binary(max_size=700), max_size=4))
    if data.draw(st.booleans()):  # a response header that opens, with any length and body
        keys = client._keys
        assert keys is not None
        length = data.draw(st.integers(0, 0xFFFF))
        body = data.draw(st.binary(max_size=400))
        sealed = keys.response.seal(hs.BODY_NONCE, body)
        chunks = [keys.response.seal(hs.HEADER_NONCE, struct.pack(">H", length)), sealed, *chunks]
    try:
        for chunk in chunks:
            client.consume_server_response(chunk)
    except SockproxyError:
        pass
    assert client.keys is None  # nothing but the server's signature earns the keys


# --------------------------------------------------------------------------- mux frames


@given(st.lists(st.binary(max_size=3000), max_size=5))
def test_frame_decoder_takes_any_bytes(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert isinstance(frame.type, FrameType)
                assert (frame.type in SESSION_FRAMES) == (frame.stream == 0)
                if frame.type is FrameType.DATA:
                    assert 0 < len(frame.body) <= MAX_DATA_FRAME
    except ProtocolError:
        pass


_BODIES = {
    FrameType.OPEN: st.binary(min_size=1, max_size=300),
    FrameType.REPLY: st.binary(min_size=1, max_size=300),
    FrameType.DATA: st.binary(min_size=1, max_size=MAX_DATA_FRAME),
    FrameType.WINDOW: st.binary(min_size=4, max_size=4),
    FrameType.EOF: st.just(b""),
    FrameType.RESET: st.just(b""),
    FrameType.PING: st.binary(min_size=8, max_size=8),
    FrameType.PONG: st.binary(min_size=8, max_size=8),
    FrameType.GOAWAY: st.just(b""),
}


@st.composite
def valid_frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(list(FrameType)))
    stream = 0 if kind in SESSION_FRAMES else draw(st.integers(1, 2**32 - 1))
    return Frame(kind, stream, draw(_BODIES[kind]))


@given(st.lists(valid_frames(), max_size=8), st.data())
def test_frame_decoder_round_trips_frames_cut_anywhere(
    frames: list[Frame], data: st.DataObject
) -> None:
    wire = b"".join(frame.encode() for frame in frames)
    decoder = FrameDecoder()
    decoded = [f for chunk in _chunks(data.draw, wire) for f in decoder.feed(chunk)]
    assert decoded == frames
    assert decoder.pending == 0


@given(valid_frames(), st.integers(0, HEADER_SIZE - 1), st.integers(0, 255))
def test_a_frame_header_byte_changed_is_refused_or_still_well_formed(
    frame: Frame, position: int, value: int
) -> None:
    wire = bytearray(frame.encode())
    wire[position] = value
    try:
        decoded = FrameDecoder().feed(bytes(wire))
    except ProtocolError:
        return
    for each in decoded:  # a header that still parses must describe a well-formed frame
        assert (each.type in SESSION_FRAMES) == (each.stream == 0)


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
