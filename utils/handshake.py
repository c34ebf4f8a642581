"""The channel handshake as two small state machines over bytes (sans-IO).

Full handshake (both sides hold an RSA key pair and the other's public key)::

    server -> local   ServerHello      version, 32-byte nonce Ns
    local  -> server  ClientHello      random X1, SHA-256 fingerprint of the local key,
                                       RSA-OAEP(server key, X25519 share Y1)
    local  -> server  ClientSignature  RSA-PSS(local key, transcript so far)
    server -> local   ServerKey        random X2, RSA-OAEP(local key, X25519 share Y2)
    server -> local   ServerSignature  RSA-PSS(server key, transcript so far)

The server checks the local's signature before any private-key operation, so a stranger
never costs it an RSA decryption or signature; the local signs first (the server must not
sign for strangers) and checks the server's signature before it decrypts. The keys
come from HKDF-SHA256 over the X25519 secret, salted with the hash of the whole transcript.

Resumed handshake (no RSA at all; the ticket comes from an earlier full handshake)::

    server -> local   ServerHello      version, fresh nonce Ns, X25519 share Ys
    local  -> server  ResumeHello      ticket id, random X1, X25519 share Y1
    local  -> server  ClientFinished   HMAC(binder key, transcript so far)
    local  -> server  (the first record, already under the new keys)
    server -> local   ServerFinished   HMAC(binder key, transcript so far)

A fresh ephemeral X25519 key on both sides keeps forward secrecy; the fresh server nonce
and share in every transcript make recorded handshakes useless to replay. Because the
server's share comes in its hello, the local's request rides with its Finished: one round
trip less for every resumed connection. docs/PROTOCOL.md has the bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from Crypto.Cipher import PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey.RSA import RsaKey
from Crypto.Signature import pss
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from utils.errors import AuthenticationError, ProtocolError, TicketRejected
from utils.keys import fingerprint_bytes

PROTOCOL_VERSION = 1
NONCE_SIZE = 32
RANDOM_SIZE = 32
SHARE_SIZE = 32
FINGERPRINT_SIZE = 32
TICKET_ID_SIZE = 16
MAC_SIZE = 32
MAX_MESSAGE_SIZE = 4096
_LENGTH = struct.Struct(">H")

SERVER_HELLO = 0x01
CLIENT_HELLO = 0x02
CLIENT_SIGNATURE = 0x03
SERVER_KEY = 0x04
SERVER_SIGNATURE = 0x05
RESUME_HELLO = 0x06
CLIENT_FINISHED = 0x07
SERVER_FINISHED = 0x08
SERVER_HELLO_SIZE = 1 + NONCE_SIZE + SHARE_SIZE

CLIENT_SIGNATURE_LABEL = b"sockproxy v1 client signature\x00"
SERVER_SIGNATURE_LABEL = b"sockproxy v1 server signature\x00"
CLIENT_SHARE_LABEL = b"sockproxy v1 client share"
SERVER_SHARE_LABEL = b"sockproxy v1 server share"
CLIENT_FINISHED_LABEL = b"sockproxy v1 client finished\x00"
SERVER_FINISHED_LABEL = b"sockproxy v1 server finished\x00"
FULL_KEYS_INFO = b"sockproxy v1 full keys"
RESUMED_KEYS_INFO = b"sockproxy v1 resumed keys"
BINDER_INFO = b"sockproxy v1 binder"

Random = Callable[[int], bytes]
Clock = Callable[[], float]


@dataclass(frozen=True)
class SessionKeys:
    """Traffic keys of one connection, named from the holder's point of view."""

    send: bytes = field(repr=False)
    receive: bytes = field(repr=False)


@dataclass(frozen=True)
class Ticket:
    """What a full handshake leaves behind for resumption."""

    ticket_id: bytes
    secret: bytes = field(repr=False)
    expires_at: float
    peer_fingerprint: bytes = b""  # on the server: which authorized key it was issued to


@dataclass(frozen=True)
class AuthorizedPeer:
    """A local's public key the server accepts, and the name the logs use for it."""

    name: str
    key: RsaKey = field(repr=False)


# How a local names its key to the server: SHA-256 of the DER SubjectPublicKeyInfo, the
# same digest the server's config computes for its authorized keys.
key_fingerprint = fingerprint_bytes


# ----------------------------------------------------------------------------- framing


def frame(message_type: int, body: bytes) -> bytes:
    """A handshake message on the wire: 2-byte length, 1-byte type, body."""
    return _LENGTH.pack(len(body) + 1) + bytes((message_type,)) + body


@dataclass(frozen=True)
class Message:
    type: int
    body: bytes
    wire: bytes


class MessageReader:
    """Splits the handshake byte stream into (type, body, wire bytes) messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take(self, count: int) -> list[Message] | None:
        """The next ``count`` messages, or None (consuming nothing) until all have arrived."""
        messages = []
        position = 0
        for _ in range(count):
            if len(self._buffer) - position < _LENGTH.size:
                return None
            (length,) = _LENGTH.unpack_from(self._buffer, position)
            if not 1 <= length <= MAX_MESSAGE_SIZE:
                raise ProtocolError(f"handshake message length {length} out of range")
            end = position + _LENGTH.size + length
            if len(self._buffer) < end:
                return None
            wire = bytes(self._buffer[position:end])
            messages.append(Message(wire[_LENGTH.size], wire[_LENGTH.size + 1 :], wire))
            position = end
        del self._buffer[:position]
        return messages

    def take_rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def _expect(message: Message, wanted: int, size: int) -> bytes:
    if message.type != wanted:
        raise ProtocolError(f"expected handshake message {wanted}, got {message.type}")
    if len(message.body) != size:
        raise ProtocolError(f"handshake message {wanted} has {len(message.body)} bytes, not {size}")
    return message.body


# ----------------------------------------------------------------------------- crypto helpers


class _Counter:
    """A thread-safe count, for the SIGUSR1 summary and the tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        with self._lock:
            self.value += 1


# Every RSA private-key operation this process has done (signatures and decryptions).
PRIVATE_KEY_OPERATIONS = _Counter()


def _sign(key: RsaKey, label: bytes, transcript: bytes, rng: Random) -> bytes:
    PRIVATE_KEY_OPERATIONS.add()
    return bytes(pss.new(key, rand_func=rng).sign(SHA256.new(label + transcript)))


def _verify(key: RsaKey, label: bytes, transcript: bytes, signature: bytes) -> None:
    try:
        pss.new(key).verify(SHA256.new(label + transcript), signature)
    except (ValueError, TypeError):
        raise AuthenticationError("signature does not verify") from None


def _seal_share(key: RsaKey, label: bytes, share: bytes, rng: Random) -> bytes:
    cipher = PKCS1_OAEP.new(key, hashAlgo=SHA256, label=label, randfunc=rng)
    return bytes(cipher.encrypt(share))


def _open_share(key: RsaKey, label: bytes, sealed: bytes) -> bytes:
    PRIVATE_KEY_OPERATIONS.add()
    try:
        share = PKCS1_OAEP.new(key, hashAlgo=SHA256, label=label).decrypt(sealed)
    except (ValueError, TypeError):
        raise AuthenticationError("share does not decrypt") from None
    if len(share) != SHARE_SIZE:
        raise AuthenticationError("share has the wrong size")
    return bytes(share)


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + hashlib.sha256(transcript).digest(), hashlib.sha256).digest()


def _check_mac(key: bytes, label: bytes, transcript: bytes, mac: bytes) -> None:
    if not hmac.compare_digest(_mac(key, label, transcript), mac):
        raise AuthenticationError("finished MAC does not verify")


def _binder_key(resumption_secret: bytes) -> bytes:
    return hkdf_sha256(resumption_secret, b"", BINDER_INFO, 32)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, size: int) -> bytes:
    """RFC 5869 HKDF with SHA-256 (stdlib hmac: ~20x faster than a pure-Python wrapper)."""
    prk = hmac.digest(salt or bytes(32), ikm, "sha256")
    output = b""
    block = b""
    counter = 1
    while len(output) < size:
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        output += block
        counter += 1
    return output[:size]


class _Ephemeral:
    """A fresh X25519 key pair for one handshake."""

    def __init__(self, rng: Random) -> None:
        if rng is os.urandom:
            self._private = X25519PrivateKey.generate()
        else:  # fixed randomness, for the test vectors
            self._private = X25519PrivateKey.from_private_bytes(rng(SHARE_SIZE))
        self.share = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def agree(self, peer_share: bytes) -> bytes:
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_share))
        except ValueError:
            # An all-zero result: the peer sent a low-order point.
            raise AuthenticationError("X25519 share is invalid") from None


@dataclass(frozen=True)
class _Derived:
    client_to_server: bytes = field(repr=False)
    server_to_client: bytes = field(repr=False)
    resumption_secret: bytes = field(repr=False)
    ticket_id: bytes


def _derive(ikm: bytes, transcript: bytes, info: bytes) -> _Derived:
    material = hkdf_sha256(ikm, hashlib.sha256(transcript).digest(), info, 32 * 3 + TICKET_ID_SIZE)
    return _Derived(material[:32], material[32:64], material[64:96], material[96:])


# ----------------------------------------------------------------------------- server tickets


class TicketStore:
    """The server's resumption tickets: bounded, expiring, thread-safe, in memory only.

    Memory only is deliberate: a server restart invalidates every ticket.
    """

    def __init__(self, lifetime: float, capacity: int = 65536, clock: Clock = time.monotonic):
        self.lifetime = lifetime
        self._capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._tickets: OrderedDict[bytes, Ticket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.lifetime > 0

    def add(self, ticket_id: bytes, secret: bytes, peer_fingerprint: bytes) -> None:
        if not self.enabled:
            return
        ticket = Ticket(ticket_id, secret, self._clock() + self.lifetime, peer_fingerprint)
        with self._lock:
            self._tickets[ticket_id] = ticket
            while len(self._tickets) > self._capacity:
                self._tickets.popitem(last=False)

    def find(self, ticket_id: bytes) -> Ticket | None:
        with self._lock:
            ticket = self._tickets.get(ticket_id)
            if ticket is not None and ticket.expires_at <= self._clock():
                del self._tickets[ticket_id]
                return None
            return ticket

    def keep_only(self, fingerprints: Collection[bytes]) -> None:
        """Forget the tickets of keys that are no longer authorized (after a SIGHUP)."""
        with self._lock:
            for ticket_id, ticket in list(self._tickets.items()):
                if ticket.peer_fingerprint not in fingerprints:
                    del self._tickets[ticket_id]


# ----------------------------------------------------------------------------- state machines


class _Handshake:
    """What both roles share: the transcript, the reader and the outcome."""

    def __init__(self, rng: Random) -> None:
        self._rng = rng
        self._reader = MessageReader()
        self._transcript = bytearray()
        self.keys: SessionKeys | None = None
        self.done = False  # the peer is authenticated (keys may come earlier, when resuming)
        self.resumed = False

    def _send(self, message_type: int, body: bytes) -> bytes:
        wire = frame(message_type, body)
        self._transcript += wire
        return wire

    def _so_far(self) -> bytes:
        return bytes(self._transcript)

    def trailing_data(self) -> bytes:
        """Bytes that came after the last handshake message (already channel records)."""
        return self._reader.take_rest()


class ClientHandshake(_Handshake):
    """The local's side. Feed it what the server sends; send what it returns.

    With a ticket it resumes; a server that does not know the ticket closes the
    connection, and the caller then starts again without one.
    """

    def __init__(
        self,
        identity: RsaKey,
        server_key: RsaKey,
        ticket: Ticket | None = None,
        *,
        rng: Random = os.urandom,
        ticket_lifetime: float = 3600.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(rng)
        self._identity = identity
        self._server_key = server_key
        self._ticket = ticket
        self._ticket_lifetime = ticket_lifetime
        self._clock = clock
        self._ephemeral: _Ephemeral | None = None
        self.new_ticket: Ticket | None = None

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the server; return bytes to send (possibly empty).

        When resuming, ``keys`` are set as soon as the local's flight is returned, so the
        caller can send its first record with it; ``done`` waits for ServerFinished.
        """
        self._reader.feed(data)
        if self._ephemeral is None:
            return self._on_server_hello()
        if not self.done:
            self._on_server_answer()
        return b""

    def _on_server_hello(self) -> bytes:
        messages = self._reader.take(1)
        if messages is None:
            return b""
        body = _expect(messages[0], SERVER_HELLO, SERVER_HELLO_SIZE)
        self._transcript += messages[0].wire
        if body[0] != PROTOCOL_VERSION:
            raise ProtocolError(f"server speaks protocol version {body[0]}")
        self._ephemeral = _Ephemeral(self._rng)
        if self._ticket is not None:
            return self._resume_hello(self._ticket, self._ephemeral, body[-SHARE_SIZE:])
        return self._full_hello(self._ephemeral)

    def _full_hello(self, ephemeral: _Ephemeral) -> bytes:
        sealed = _seal_share(self._server_key, CLIENT_SHARE_LABEL, ephemeral.share, self._rng)
        hello = self._send(
            CLIENT_HELLO, self._rng(RANDOM_SIZE) + key_fingerprint(self._identity) + sealed
        )
        signature = _sign(self._identity, CLIENT_SIGNATURE_LABEL, self._so_far(), self._rng)
        return hello + self._send(CLIENT_SIGNATURE, signature)

    def _resume_hello(self, ticket: Ticket, ephemeral: _Ephemeral, server_share: bytes) -> bytes:
        body = ticket.ticket_id + self._rng(RANDOM_SIZE) + ephemeral.share
        hello = self._send(RESUME_HELLO, body)
        mac = _mac(_binder_key(ticket.secret), CLIENT_FINISHED_LABEL, self._so_far())
        flight = hello + self._send(CLIENT_FINISHED, mac)
        secret = ephemeral.agree(server_share) + ticket.secret
        derived = _derive(secret, self._so_far(), RESUMED_KEYS_INFO)
        self.keys = SessionKeys(derived.client_to_server, derived.server_to_client)
        self.resumed = True
        return flight

    def _on_server_answer(self) -> None:
        if self._ticket is not None:
            finished = self._reader.take(1)
            if finished is not None:
                self._confirm_resumed(self._ticket, finished[0])
            return
        messages = self._reader.take(2)
        if messages is not None:
            assert self._ephemeral is not None
            self._finish_full(self._ephemeral, *messages)

    def _finish_full(self, ephemeral: _Ephemeral, key_msg: Message, sig_msg: Message) -> None:
        sealed_size = self._identity.size_in_bytes()
        body = _expect(key_msg, SERVER_KEY, RANDOM_SIZE + sealed_size)
        self._transcript += key_msg.wire
        signature = _expect(sig_msg, SERVER_SIGNATURE, self._server_key.size_in_bytes())
        _verify(self._server_key, SERVER_SIGNATURE_LABEL, self._so_far(), signature)
        self._transcript += sig_msg.wire
        share = _open_share(self._identity, SERVER_SHARE_LABEL, body[RANDOM_SIZE:])
        derived = _derive(ephemeral.agree(share), self._so_far(), FULL_KEYS_INFO)
        self.keys = SessionKeys(derived.client_to_server, derived.server_to_client)
        self.done = True
        expires = self._clock() + self._ticket_lifetime
        self.new_ticket = Ticket(derived.ticket_id, derived.resumption_secret, expires)

    def _confirm_resumed(self, ticket: Ticket, finished: Message) -> None:
        mac = _expect(finished, SERVER_FINISHED, MAC_SIZE)
        _check_mac(_binder_key(ticket.secret), SERVER_FINISHED_LABEL, self._so_far(), mac)
        self._transcript += finished.wire
        self.done = True


class ServerHandshake(_Handshake):
    """The server's side. Send ``start()`` at once; then feed it what the local sends."""

    def __init__(
        self,
        identity: RsaKey,
        authorized: Mapping[bytes, AuthorizedPeer],
        tickets: TicketStore,
        *,
        rng: Random = os.urandom,
    ) -> None:
        super().__init__(rng)
        self._identity = identity
        self._authorized = authorized
        self._tickets = tickets
        self._hello_ephemeral: _Ephemeral | None = None
        self.peer_name = ""

    def start(self) -> bytes:
        """ServerHello: the nonce, and the share a resuming local will use."""
        nonce = self._rng(NONCE_SIZE)
        self._hello_ephemeral = _Ephemeral(self._rng)
        body = bytes((PROTOCOL_VERSION,)) + nonce + self._hello_ephemeral.share
        return self._send(SERVER_HELLO, body)

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the local; return the answer once both of its messages are in."""
        if self._hello_ephemeral is None or self.done:
            raise ProtocolError("handshake bytes out of order")
        self._reader.feed(data)
        messages = self._reader.take(2)
        if messages is None:
            return b""
        first, second = messages
        if first.type == RESUME_HELLO:
            return self._answer_resume(first, second, self._hello_ephemeral)
        return self._answer_full(first, second)

    def _answer_full(self, hello_msg: Message, sig_msg: Message) -> bytes:
        sealed_size = self._identity.size_in_bytes()
        body = _expect(hello_msg, CLIENT_HELLO, RANDOM_SIZE + FINGERPRINT_SIZE + sealed_size)
        fingerprint = body[RANDOM_SIZE : RANDOM_SIZE + FINGERPRINT_SIZE]
        peer = self._authorized.get(fingerprint)
        if peer is None:
            raise AuthenticationError(f"unknown local key {fingerprint.hex()[:16]}")
        self._transcript += hello_msg.wire
        signature = _expect(sig_msg, CLIENT_SIGNATURE, peer.key.size_in_bytes())
        # Verify before any private-key operation: a stranger costs us one public-key check.
        _verify(peer.key, CLIENT_SIGNATURE_LABEL, self._so_far(), signature)
        self._transcript += sig_msg.wire
        client_share = _open_share(self._identity, CLIENT_SHARE_LABEL, body[-sealed_size:])
        ephemeral = _Ephemeral(self._rng)
        sealed = _seal_share(peer.key, SERVER_SHARE_LABEL, ephemeral.share, self._rng)
        answer = self._send(SERVER_KEY, self._rng(RANDOM_SIZE) + sealed)
        signature = _sign(self._identity, SERVER_SIGNATURE_LABEL, self._so_far(), self._rng)
        answer += self._send(SERVER_SIGNATURE, signature)
        derived = _derive(ephemeral.agree(client_share), self._so_far(), FULL_KEYS_INFO)
        self.keys = SessionKeys(derived.server_to_client, derived.client_to_server)
        self.done = True
        self.peer_name = peer.name
        self._tickets.add(derived.ticket_id, derived.resumption_secret, fingerprint)
        return answer

    def _answer_resume(
        self, hello_msg: Message, finished_msg: Message, ephemeral: _Ephemeral
    ) -> bytes:
        body = _expect(hello_msg, RESUME_HELLO, TICKET_ID_SIZE + RANDOM_SIZE + SHARE_SIZE)
        ticket = self._tickets.find(body[:TICKET_ID_SIZE])
        if ticket is None:
            raise TicketRejected("unknown or expired resumption ticket")
        peer = self._authorized.get(ticket.peer_fingerprint)
        if peer is None:  # its key was removed or replaced since the ticket was issued
            raise TicketRejected("resumption ticket of a key that is no longer authorized")
        self._transcript += hello_msg.wire
        binder = _binder_key(ticket.secret)
        mac = _expect(finished_msg, CLIENT_FINISHED, MAC_SIZE)
        _check_mac(binder, CLIENT_FINISHED_LABEL, self._so_far(), mac)
        self._transcript += finished_msg.wire
        secret = ephemeral.agree(body[-SHARE_SIZE:]) + ticket.secret
        derived = _derive(secret, self._so_far(), RESUMED_KEYS_INFO)
        self.keys = SessionKeys(derived.server_to_client, derived.client_to_server)
        self.done = True
        self.peer_name = peer.name
        self.resumed = True
        return self._send(SERVER_FINISHED, _mac(binder, SERVER_FINISHED_LABEL, self._so_far()))
