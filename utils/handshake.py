"""The channel handshake, version 2, as two sans-IO state machines (docs/PROTOCOL.md section 2).

::

    local  -> server  ClientInit      R, masked E, sealed InitHeader, sealed InitBody
                                      (identity, RSA signature, early data: the first request)
    server -> local   ServerResponse  sealed ResponseHeader, sealed ResponseBody (F, RSA signature)

The local speaks first and the server says nothing until the ClientInit has proven that its
sender holds an authorized key: a stranger costs the server one X25519 operation (the
sealed header does not open without the server's static key), and a stranger who knows
the server's public key one more RSA signature verification; never an RSA private-key
operation. Every byte on the wire is random to an observer who lacks the server's public
key file: ``R`` is random, ``E`` is masked, everything else is AES-GCM output.

Names follow the document: ``create_client_init`` / ``consume_client_init`` /
``create_server_response`` / ``consume_server_response``. Replay filtering and the clock
window live with the server (server/replay.py), and so does the private-key counter.
"""

from __future__ import annotations

import enum
import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from utils.crypto import (
    KEY_SIZE,
    SHARE_SIZE,
    TAG_SIZE,
    Aead,
    Ephemeral,
    Random,
    RsaKey,
    hkdf,
    rsa_sign,
    rsa_verify,
    sha256,
    static_x25519,
)
from utils.errors import AuthenticationError, ProtocolError
from utils.keys import fingerprint_bytes

PROTOCOL_VERSION = 2
RANDOM_SIZE = 32
FINGERPRINT_SIZE = 32
MAX_PADDING = 255
MAX_BODY_SIZE = 65535 - TAG_SIZE
MAX_EARLY_DATA = 16384

PROTOCOL_LABEL = b"sockproxy v2"
MASK_INFO = b"sockproxy v2 mask"
INIT_KEYS_INFO = b"sockproxy v2 init keys"
TRAFFIC_KEYS_INFO = b"sockproxy v2 traffic keys"
CLIENT_SIGNATURE_LABEL = b"sockproxy v2 client signature\x00"
SERVER_SIGNATURE_LABEL = b"sockproxy v2 server signature\x00"

_U16 = struct.Struct(">H")
_INIT_HEADER = struct.Struct(">QH")  # timestamp in ms since the epoch, body length
INIT_PREFIX_SIZE = RANDOM_SIZE + SHARE_SIZE
INIT_HEAD_SIZE = INIT_PREFIX_SIZE + _INIT_HEADER.size + TAG_SIZE
RESPONSE_HEAD_SIZE = _U16.size + TAG_SIZE
HEADER_NONCE = bytes(12)
BODY_NONCE = bytes(11) + b"\x01"

Clock = Callable[[], float]


@dataclass(frozen=True)
class SessionKeys:
    """Traffic keys of one session, named from the holder's point of view."""

    send: bytes = field(repr=False)
    receive: bytes = field(repr=False)


@dataclass(frozen=True)
class AuthorizedPeer:
    """A local's public key the server accepts, and the name the logs use for it."""

    name: str
    key: RsaKey = field(repr=False)


@dataclass(frozen=True)
class ServerPublic:
    """What a local knows of a server: its RSA public key and its static X25519 share."""

    key: RsaKey = field(repr=False)
    static_share: bytes


@dataclass(frozen=True)
class ServerSecret:
    """What the server holds: the static X25519 key and a signer (which counts its uses)."""

    static: Ephemeral = field(repr=False)
    sign: Callable[[bytes], bytes] = field(repr=False)


# ----------------------------------------------------------------------------- messages


def _padding(rng: Random) -> bytes:
    return rng(rng(1)[0])


def _take_u16_prefixed(data: bytes, position: int, what: str) -> tuple[bytes, int]:
    if len(data) < position + _U16.size:
        raise ProtocolError(f"{what}: truncated length")
    (length,) = _U16.unpack_from(data, position)
    start = position + _U16.size
    if len(data) < start + length:
        raise ProtocolError(f"{what}: truncated")
    return data[start : start + length], start + length


@dataclass(frozen=True)
class InitHeader:
    """The ClientInit's fixed-size sealed header: when it was made, how long the body is."""

    timestamp_ms: int
    body_length: int

    def encode(self) -> bytes:
        return _INIT_HEADER.pack(self.timestamp_ms, self.body_length)

    @classmethod
    def decode(cls, data: bytes) -> InitHeader:
        timestamp_ms, body_length = _INIT_HEADER.unpack(data)
        if not TAG_SIZE <= body_length <= MAX_BODY_SIZE + TAG_SIZE:
            raise ProtocolError(f"ClientInit body length {body_length} out of range")
        return cls(timestamp_ms, body_length)


@dataclass(frozen=True)
class InitBody:
    """Who the local is, its proof, and the early data (mux frames) riding along."""

    fingerprint: bytes
    signature: bytes
    early: bytes
    padding: bytes = b""

    def encode(self) -> bytes:
        return b"".join(
            (
                self.fingerprint,
                _U16.pack(len(self.signature)),
                self.signature,
                _U16.pack(len(self.early)),
                self.early,
                self.padding,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> InitBody:
        if len(data) < FINGERPRINT_SIZE:
            raise ProtocolError("ClientInit body: truncated fingerprint")
        signature, position = _take_u16_prefixed(data, FINGERPRINT_SIZE, "ClientInit signature")
        early, position = _take_u16_prefixed(data, position, "ClientInit early data")
        if len(early) > MAX_EARLY_DATA:
            raise ProtocolError("ClientInit early data too long")
        return cls(data[:FINGERPRINT_SIZE], signature, early, data[position:])


FLAG_EARLY_DEFERRED = 0x01  # the server holds the early data until a record arrives


@dataclass(frozen=True)
class ResponseBody:
    """The server's ephemeral share, its flags and its signature over the transcript."""

    share: bytes
    flags: int
    signature: bytes
    padding: bytes = b""

    def encode(self) -> bytes:
        return b"".join(
            (
                self.share,
                bytes((self.flags,)),
                _U16.pack(len(self.signature)),
                self.signature,
                self.padding,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> ResponseBody:
        if len(data) < SHARE_SIZE + 1:
            raise ProtocolError("ServerResponse body: truncated share")
        flags = data[SHARE_SIZE]
        if flags & ~FLAG_EARLY_DEFERRED:
            raise ProtocolError(f"ServerResponse flags {flags:#04x} unknown")
        signature, position = _take_u16_prefixed(data, SHARE_SIZE + 1, "ServerResponse signature")
        return cls(data[:SHARE_SIZE], flags, signature, data[position:])


@dataclass(frozen=True)
class ClientInit:
    """What the server learned from a ClientInit that proved itself."""

    peer: AuthorizedPeer
    fingerprint: bytes
    timestamp_ms: int
    random: bytes  # R: the replay cache's key
    early: bytes


# ----------------------------------------------------------------------------- key schedule


def mask_for(static_share: bytes, random: bytes) -> bytes:
    return hkdf(static_share, random, MASK_INFO, SHARE_SIZE)


def _xor(left: bytes, right: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


@dataclass(frozen=True)
class _InitKeys:
    hash: bytes  # h0: binds the static share, R and E
    init: Aead = field(repr=False)  # local -> server, for the ClientInit
    response: Aead = field(repr=False)  # server -> local, for the ServerResponse


def _init_keys(es: bytes, static_share: bytes, random: bytes, share: bytes) -> _InitKeys:
    h0 = sha256(PROTOCOL_LABEL, static_share, random, share)
    material = hkdf(es, h0, INIT_KEYS_INFO, 2 * KEY_SIZE)
    return _InitKeys(h0, Aead(material[:KEY_SIZE]), Aead(material[KEY_SIZE:]))


def _client_signed(h0: bytes, header: bytes, fingerprint: bytes) -> bytes:
    return CLIENT_SIGNATURE_LABEL + h0 + header + fingerprint


def _server_signed(init_wire: bytes, share: bytes, flags: int) -> bytes:
    return SERVER_SIGNATURE_LABEL + sha256(init_wire) + share + bytes((flags,))


def _traffic(es: bytes, ee: bytes, init_wire: bytes, response_wire: bytes) -> tuple[bytes, bytes]:
    """(local -> server key, server -> local key)."""
    material = hkdf(es + ee, sha256(init_wire, response_wire), TRAFFIC_KEYS_INFO, 2 * KEY_SIZE)
    return material[:KEY_SIZE], material[KEY_SIZE:]


def _open_sealed(aead: Aead, nonce: bytes, sealed: bytes, ad: bytes | None, what: str) -> bytes:
    try:
        return aead.open(nonce, sealed, ad)
    except AuthenticationError:
        raise AuthenticationError(f"{what} does not open") from None


# ----------------------------------------------------------------------------- the local


class ClientState(enum.Enum):
    START = "start"
    AWAIT_RESPONSE = "await response"
    ESTABLISHED = "established"


class ClientHandshake:
    """The local's side: ``create_client_init``, then feed ``consume_server_response``."""

    def __init__(
        self,
        identity: RsaKey,
        server: ServerPublic,
        *,
        rng: Random = os.urandom,
        clock: Clock = time.time,
    ) -> None:
        self.state = ClientState.START
        self._identity = identity
        self._server = server
        self._rng = rng
        self._clock = clock
        self._ephemeral = Ephemeral(rng)
        self._buffer = bytearray()
        self._init_wire = b""
        self._keys: _InitKeys | None = None
        self._es = b""
        self.keys: SessionKeys | None = None
        self.early_deferred = False  # the server asks for a record before it acts on early data

    def create_client_init(self, early: bytes = b"") -> bytes:
        if self.state is not ClientState.START:
            raise ProtocolError("ClientInit already sent")
        if len(early) > MAX_EARLY_DATA:
            raise ValueError("early data too long")
        random = self._rng(RANDOM_SIZE)
        share = self._ephemeral.share
        masked = _xor(share, mask_for(self._server.static_share, random))
        self._es = self._ephemeral.agree(self._server.static_share)
        keys = self._keys = _init_keys(self._es, self._server.static_share, random, share)
        fingerprint = fingerprint_bytes(self._identity)
        timestamp_ms = int(self._clock() * 1000)
        signature_slot = self._identity.size_in_bytes()
        body_length = (
            FINGERPRINT_SIZE + 2 + signature_slot + 2 + len(early) + TAG_SIZE
        )  # before padding
        padding = _padding(self._rng)
        header = InitHeader(timestamp_ms, body_length + len(padding)).encode()
        signed = _client_signed(keys.hash, header, fingerprint)
        signature = rsa_sign(self._identity, signed, self._rng)
        body = InitBody(fingerprint, signature, early, padding).encode()
        prefix = random + masked
        self._init_wire = b"".join(
            (
                prefix,
                keys.init.seal(HEADER_NONCE, header, prefix),
                keys.init.seal(BODY_NONCE, body),
            )
        )
        self.state = ClientState.AWAIT_RESPONSE
        return self._init_wire

    def consume_server_response(self, data: bytes) -> SessionKeys | None:
        """Feed bytes from the server; the session keys once the whole response checked out."""
        if self.state is not ClientState.AWAIT_RESPONSE:
            raise ProtocolError("ServerResponse out of order")
        assert self._keys is not None
        self._buffer += data
        if len(self._buffer) < RESPONSE_HEAD_SIZE:
            return None
        head = bytes(self._buffer[:RESPONSE_HEAD_SIZE])
        plain = _open_sealed(self._keys.response, HEADER_NONCE, head, None, "ServerResponse header")
        (body_length,) = _U16.unpack(plain)
        if body_length < TAG_SIZE:
            raise ProtocolError("ServerResponse body length out of range")
        end = RESPONSE_HEAD_SIZE + body_length
        if len(self._buffer) < end:
            return None
        sealed = bytes(self._buffer[RESPONSE_HEAD_SIZE:end])
        body = ResponseBody.decode(
            _open_sealed(self._keys.response, BODY_NONCE, sealed, None, "ServerResponse body")
        )
        signed = _server_signed(self._init_wire, body.share, body.flags)
        rsa_verify(self._server.key, signed, body.signature)
        self.early_deferred = bool(body.flags & FLAG_EARLY_DEFERRED)
        response_wire = bytes(self._buffer[:end])
        del self._buffer[:end]
        ee = self._ephemeral.agree(body.share)
        send, receive = _traffic(self._es, ee, self._init_wire, response_wire)
        self.keys = SessionKeys(send, receive)
        self.state = ClientState.ESTABLISHED
        return self.keys

    def trailing_data(self) -> bytes:
        """Bytes that came after the ServerResponse (already records)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


# ----------------------------------------------------------------------------- the server


class ServerState(enum.Enum):
    AWAIT_HEAD = "await head"
    AWAIT_BODY = "await body"
    AUTHENTICATED = "authenticated"
    ESTABLISHED = "established"


class ServerHandshake:
    """The server's side: feed ``consume_client_init`` until it returns the proven
    ClientInit; the caller checks the clock window and the replay cache, then sends
    ``create_server_response()``. Any exception means: stay silent, close later."""

    def __init__(
        self,
        secret: ServerSecret,
        authorized: Mapping[bytes, AuthorizedPeer],
        *,
        rng: Random = os.urandom,
    ) -> None:
        self.state = ServerState.AWAIT_HEAD
        self._secret = secret
        self._authorized = authorized
        self._rng = rng
        self._buffer = bytearray()
        self._keys: _InitKeys | None = None
        self._header: InitHeader | None = None
        self._share = b""
        self._es = b""
        self._init_wire = b""
        self.keys: SessionKeys | None = None

    def bytes_wanted(self) -> int:
        """How many more bytes the ClientInit needs (0 once it is complete)."""
        if self.state is ServerState.AWAIT_HEAD:
            return max(INIT_HEAD_SIZE - len(self._buffer), 0)
        if self.state is ServerState.AWAIT_BODY:
            assert self._header is not None
            return max(INIT_HEAD_SIZE + self._header.body_length - len(self._buffer), 0)
        return 0

    def consume_client_init(self, data: bytes) -> ClientInit | None:
        if self.state not in (ServerState.AWAIT_HEAD, ServerState.AWAIT_BODY):
            raise ProtocolError("ClientInit bytes out of order")
        self._buffer += data
        if self.state is ServerState.AWAIT_HEAD:
            if len(self._buffer) < INIT_HEAD_SIZE:
                return None
            self._open_head(bytes(self._buffer[:INIT_HEAD_SIZE]))
        assert self._header is not None
        end = INIT_HEAD_SIZE + self._header.body_length
        if len(self._buffer) < end:
            return None
        self._init_wire = bytes(self._buffer[:end])
        del self._buffer[:end]
        return self._open_body(self._init_wire[INIT_HEAD_SIZE:])

    def _open_head(self, head: bytes) -> None:
        """One X25519 operation: everything a stranger can make the server spend."""
        random, masked = head[:RANDOM_SIZE], head[RANDOM_SIZE:INIT_PREFIX_SIZE]
        static_share = self._secret.static.share
        self._share = _xor(masked, mask_for(static_share, random))
        self._es = self._secret.static.agree(self._share)
        self._keys = _init_keys(self._es, static_share, random, self._share)
        sealed = head[INIT_PREFIX_SIZE:]
        prefix = head[:INIT_PREFIX_SIZE]
        try:
            plain = self._keys.init.open(HEADER_NONCE, sealed, prefix)
        except AuthenticationError:
            raise NotForThisServer("ClientInit header does not open") from None
        self._header = InitHeader.decode(plain)
        self.state = ServerState.AWAIT_BODY

    def _open_body(self, sealed: bytes) -> ClientInit:
        assert self._keys is not None and self._header is not None
        plain = _open_sealed(self._keys.init, BODY_NONCE, sealed, None, "ClientInit body")
        body = InitBody.decode(plain)
        peer = self._authorized.get(body.fingerprint)
        if peer is None:
            raise UnknownKey(body.fingerprint)
        signed = _client_signed(self._keys.hash, self._header.encode(), body.fingerprint)
        rsa_verify(peer.key, signed, body.signature)
        self.state = ServerState.AUTHENTICATED
        random = self._init_wire[:RANDOM_SIZE]
        return ClientInit(peer, body.fingerprint, self._header.timestamp_ms, random, body.early)

    def create_server_response(self, defer_early: bool = False) -> bytes:
        """The answer; ``defer_early``: tell the local that its early data waits for its
        first record (the caller holds it back, see server/replay.py)."""
        if self.state is not ServerState.AUTHENTICATED:
            raise ProtocolError("ServerResponse before an authenticated ClientInit")
        assert self._keys is not None
        ephemeral = Ephemeral(self._rng)
        flags = FLAG_EARLY_DEFERRED if defer_early else 0
        signature = self._secret.sign(_server_signed(self._init_wire, ephemeral.share, flags))
        body = ResponseBody(ephemeral.share, flags, signature, _padding(self._rng)).encode()
        sealed_body = self._keys.response.seal(BODY_NONCE, body)
        header = _U16.pack(len(sealed_body))
        response_wire = self._keys.response.seal(HEADER_NONCE, header) + sealed_body
        receive, send = _traffic(
            self._es, ephemeral.agree(self._share), self._init_wire, response_wire
        )
        self.keys = SessionKeys(send, receive)
        self.state = ServerState.ESTABLISHED
        return response_wire

    def trailing_data(self) -> bytes:
        """Bytes that came after the ClientInit (records the local sent right behind it)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


class NotForThisServer(AuthenticationError):
    """The first 90 bytes do not open with this server's static key: a probe, garbage, or a
    local whose ``server_public_key`` is another server's."""


class UnknownKey(AuthenticationError):
    """A ClientInit that opened (its sender knows the server's public key) from a key the
    server does not list; ``fingerprint`` is the raw SHA-256 the local announced."""

    def __init__(self, fingerprint: bytes) -> None:
        super().__init__("unknown local key")
        self.fingerprint = fingerprint


def server_secret(
    private_key: RsaKey, sign: Callable[[bytes], bytes] | None = None
) -> ServerSecret:
    """The server's handshake secret from its RSA key, made once at start (not per connection)."""
    signer = sign if sign is not None else (lambda message: rsa_sign(private_key, message))
    return ServerSecret(static_x25519(private_key), signer)
