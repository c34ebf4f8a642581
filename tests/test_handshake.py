"""The handshake state machines: success, and every tampering, replay and expiry case."""

from __future__ import annotations

from unittest import mock

import pytest
from Crypto.PublicKey.RSA import RsaKey
from hypothesis import given, settings
from hypothesis import strategies as st

import utils.handshake as hs
from tests.vectors import Drbg, vector_key
from utils.errors import AuthenticationError, ProtocolError, SockproxyError, TicketRejected
from utils.handshake import (
    AuthorizedPeer,
    ClientHandshake,
    ServerHandshake,
    Ticket,
    TicketStore,
    key_fingerprint,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def local_key() -> RsaKey:
    return vector_key("local")


@pytest.fixture(scope="module")
def server_key() -> RsaKey:
    return vector_key("server")


@pytest.fixture(scope="module")
def stranger_key() -> RsaKey:
    return vector_key("stranger")


def peers_for(key: RsaKey) -> dict[bytes, AuthorizedPeer]:
    return {key_fingerprint(key): AuthorizedPeer("alice", key.public_key())}


def handshake(
    local: RsaKey,
    server: RsaKey,
    store: TicketStore,
    ticket: Ticket | None = None,
    *,
    authorized: RsaKey | None = None,
    expected_server: RsaKey | None = None,
) -> tuple[ClientHandshake, ServerHandshake]:
    client = ClientHandshake(local, (expected_server or server).public_key(), ticket)
    responder = ServerHandshake(server, peers_for(authorized or local), store)
    answer = responder.receive(client.receive(responder.start()))
    client.receive(answer)
    return client, responder


def test_full_then_resumed_handshake_agree_on_fresh_keys(
    local_key: RsaKey, server_key: RsaKey
) -> None:
    store = TicketStore(3600)
    client, server = handshake(local_key, server_key, store)
    assert client.done and server.done and not client.resumed
    assert client.keys == hs.SessionKeys(server.keys.receive, server.keys.send)  # type: ignore[union-attr]
    assert client.keys is not None and client.keys.send != client.keys.receive
    assert server.peer_name == "alice"
    again, server_again = handshake(local_key, server_key, store, client.new_ticket)
    assert again.resumed and server_again.resumed and server_again.peer_name == "alice"
    assert again.keys is not None and again.keys.send != client.keys.send
    third, _ = handshake(local_key, server_key, store, client.new_ticket)
    assert third.keys is not None and third.keys.send != again.keys.send


def test_unknown_local_key_is_refused_without_private_key_operations(
    local_key: RsaKey, server_key: RsaKey, stranger_key: RsaKey
) -> None:
    with (
        mock.patch.object(hs, "_open_share", wraps=hs._open_share) as decrypt,
        mock.patch.object(hs, "_sign", wraps=hs._sign) as sign,
        pytest.raises(AuthenticationError, match="unknown local key"),
    ):
        handshake(stranger_key, server_key, TicketStore(3600), authorized=local_key)
    assert sign.call_count == 1  # the stranger's own signature; the server signed nothing
    assert decrypt.call_count == 0


def test_bad_signature_stops_the_server_before_any_private_key_operation(
    local_key: RsaKey, server_key: RsaKey, stranger_key: RsaKey
) -> None:
    """A stranger that claims an authorized fingerprint but signs with its own key."""
    client = ClientHandshake(stranger_key, server_key.public_key())
    responder = ServerHandshake(server_key, peers_for(local_key), TicketStore(3600))
    messages = bytearray(client.receive(responder.start()))
    fingerprint_at = 2 + 1 + 32
    messages[fingerprint_at : fingerprint_at + 32] = key_fingerprint(local_key)
    with (
        mock.patch.object(hs, "_open_share", wraps=hs._open_share) as decrypt,
        mock.patch.object(hs, "_sign", wraps=hs._sign) as sign,
        pytest.raises(AuthenticationError, match="signature"),
    ):
        responder.receive(bytes(messages))
    assert (decrypt.call_count, sign.call_count) == (0, 0)


def test_impersonated_server_is_refused(
    local_key: RsaKey, server_key: RsaKey, stranger_key: RsaKey
) -> None:
    # The impostor cannot open the share sealed to the real server's key...
    with pytest.raises(AuthenticationError):
        handshake(local_key, stranger_key, TicketStore(3600), expected_server=server_key)
    # ...and a local that expects another server rejects the real server's signature.
    client = ClientHandshake(local_key, stranger_key.public_key())
    responder = ServerHandshake(server_key, peers_for(local_key), TicketStore(3600))
    with pytest.raises(AuthenticationError):
        client.receive(responder.receive(client.receive(responder.start())))


def _full_exchange(local_key: RsaKey, server_key: RsaKey) -> tuple[bytes, bytes, bytes]:
    client = ClientHandshake(local_key, server_key.public_key(), rng=Drbg(b"c"))
    responder = ServerHandshake(server_key, peers_for(local_key), TicketStore(3600), rng=Drbg(b"s"))
    hello = responder.start()
    client_messages = client.receive(hello)
    return hello, client_messages, responder.receive(client_messages)


@given(position=st.integers(0, 10**6), bit=st.integers(0, 7))
@settings(max_examples=60, deadline=None)
def test_any_flipped_bit_from_the_local_is_refused(position: int, bit: int) -> None:
    local_key, server_key = vector_key("local"), vector_key("server")
    _, client_messages, _ = _full_exchange(local_key, server_key)
    tampered = bytearray(client_messages)
    tampered[position % len(tampered)] ^= 1 << bit
    responder = ServerHandshake(server_key, peers_for(local_key), TicketStore(3600), rng=Drbg(b"s"))
    responder.start()
    with pytest.raises(SockproxyError):
        if not responder.receive(bytes(tampered)):
            raise ProtocolError("incomplete")  # a longer length field: still waiting = refused


@given(position=st.integers(0, 10**6), bit=st.integers(0, 7))
@settings(max_examples=60, deadline=None)
def test_any_flipped_bit_from_the_server_is_refused(position: int, bit: int) -> None:
    local_key, server_key = vector_key("local"), vector_key("server")
    hello, _, server_messages = _full_exchange(local_key, server_key)
    tampered = bytearray(server_messages)
    tampered[position % len(tampered)] ^= 1 << bit
    client = ClientHandshake(local_key, server_key.public_key(), rng=Drbg(b"c"))
    client.receive(hello)
    with pytest.raises(SockproxyError):
        client.receive(bytes(tampered))
        if not client.done:
            raise ProtocolError("incomplete")


def test_tampered_server_hello_changes_the_transcript_and_fails(
    local_key: RsaKey, server_key: RsaKey
) -> None:
    hello, _, _ = _full_exchange(local_key, server_key)
    bad_version = bytearray(hello)
    bad_version[3] = 2
    with pytest.raises(ProtocolError, match="version"):
        ClientHandshake(local_key, server_key.public_key()).receive(bytes(bad_version))


def test_replayed_full_handshake_is_refused(local_key: RsaKey, server_key: RsaKey) -> None:
    _, recorded, _ = _full_exchange(local_key, server_key)
    responder = ServerHandshake(server_key, peers_for(local_key), TicketStore(3600))
    responder.start()  # a fresh nonce: the recorded signature no longer covers the transcript
    with pytest.raises(AuthenticationError, match="signature"):
        responder.receive(recorded)


def test_replayed_resumption_is_refused(local_key: RsaKey, server_key: RsaKey) -> None:
    store = TicketStore(3600)
    client, _ = handshake(local_key, server_key, store)
    resumer = ClientHandshake(local_key, server_key.public_key(), client.new_ticket)
    first = ServerHandshake(server_key, peers_for(local_key), store)
    recorded = resumer.receive(first.start())
    first.receive(recorded)
    second = ServerHandshake(server_key, peers_for(local_key), store)
    second.start()
    with pytest.raises(AuthenticationError, match="MAC"):
        second.receive(recorded)


def test_tampered_resumption_is_refused(local_key: RsaKey, server_key: RsaKey) -> None:
    store = TicketStore(3600)
    client, _ = handshake(local_key, server_key, store)
    for position in range(3, 2 + 0x51):  # every body byte of ResumeHello
        resumer = ClientHandshake(local_key, server_key.public_key(), client.new_ticket)
        responder = ServerHandshake(server_key, peers_for(local_key), store)
        messages = bytearray(resumer.receive(responder.start()))
        messages[position] ^= 0x01
        with pytest.raises((AuthenticationError, TicketRejected)):
            responder.receive(bytes(messages))


def test_expired_ticket_is_refused(local_key: RsaKey, server_key: RsaKey) -> None:
    clock = Clock()
    store = TicketStore(60, clock=clock)
    client, _ = handshake(local_key, server_key, store)
    clock.now += 59
    handshake(local_key, server_key, store, client.new_ticket)
    clock.now += 2
    with pytest.raises(TicketRejected):
        handshake(local_key, server_key, store, client.new_ticket)


def test_server_restart_invalidates_tickets(local_key: RsaKey, server_key: RsaKey) -> None:
    client, _ = handshake(local_key, server_key, TicketStore(3600))
    with pytest.raises(TicketRejected):
        handshake(local_key, server_key, TicketStore(3600), client.new_ticket)


def test_revoked_key_loses_its_tickets(
    local_key: RsaKey, server_key: RsaKey, stranger_key: RsaKey
) -> None:
    store = TicketStore(3600)
    client, _ = handshake(local_key, server_key, store)
    # The same name now holds another key (a rotation): the old key's ticket must not work.
    rotated = {key_fingerprint(stranger_key): AuthorizedPeer("alice", stranger_key.public_key())}
    resumer = ClientHandshake(local_key, server_key.public_key(), client.new_ticket)
    responder = ServerHandshake(server_key, rotated, store)
    with pytest.raises(TicketRejected, match="no longer authorized"):
        responder.receive(resumer.receive(responder.start()))
    # And the store forgets tickets of keys that are gone.
    store.keep_only(rotated.keys())
    with pytest.raises(TicketRejected, match="unknown"):
        handshake(local_key, server_key, store, client.new_ticket)


def test_disabled_resumption_stores_nothing(local_key: RsaKey, server_key: RsaKey) -> None:
    store = TicketStore(0)
    client, _ = handshake(local_key, server_key, store)
    assert client.new_ticket is not None
    with pytest.raises(TicketRejected):
        handshake(local_key, server_key, store, client.new_ticket)


def test_ticket_store_is_bounded() -> None:
    store = TicketStore(3600, capacity=3)
    for index in range(5):
        store.add(bytes([index]) * 16, b"s" * 32, b"f" * 32)
    assert store.find(b"\x00" * 16) is None and store.find(b"\x01" * 16) is None
    assert store.find(b"\x04" * 16) is not None


@pytest.mark.parametrize("length", [0, 4097])
def test_message_length_out_of_range_is_refused(length: int, server_key: RsaKey) -> None:
    responder = ServerHandshake(server_key, {}, TicketStore(3600))
    responder.start()
    with pytest.raises(ProtocolError, match="length"):
        responder.receive(length.to_bytes(2, "big") + b"\x02" * 40)


def test_handshake_bytes_split_one_at_a_time(local_key: RsaKey, server_key: RsaKey) -> None:
    client = ClientHandshake(local_key, server_key.public_key())
    responder = ServerHandshake(server_key, peers_for(local_key), TicketStore(3600))
    to_server = b"".join(client.receive(bytes([b])) for b in responder.start())
    to_client = b"".join(responder.receive(bytes([b])) for b in to_server)
    for byte in to_client:
        client.receive(bytes([byte]))
    assert client.done and client.keys is not None and responder.keys is not None
    assert client.keys.send == responder.keys.receive


def test_low_order_x25519_share_is_refused(local_key: RsaKey, server_key: RsaKey) -> None:
    store = TicketStore(3600)
    client, _ = handshake(local_key, server_key, store)
    assert client.new_ticket is not None
    responder = ServerHandshake(server_key, peers_for(local_key), store)
    resumer = ClientHandshake(local_key, server_key.public_key(), client.new_ticket)
    resumer.receive(responder.start())
    # Rebuild a valid ResumeHello whose share is the all-zero (low-order) point.
    body = client.new_ticket.ticket_id + bytes(32) + bytes(32)
    hello = hs.frame(hs.RESUME_HELLO, body)
    transcript = responder._so_far() + hello
    mac = hs._mac(hs._binder_key(client.new_ticket.secret), hs.CLIENT_FINISHED_LABEL, transcript)
    with pytest.raises(AuthenticationError, match="X25519"):
        responder.receive(hello + hs.frame(hs.CLIENT_FINISHED, mac))


def test_resuming_local_has_keys_before_the_server_confirms(
    local_key: RsaKey, server_key: RsaKey
) -> None:
    """The request rides with ClientFinished; ServerFinished is still required to finish."""
    store = TicketStore(3600)
    first, _ = handshake(local_key, server_key, store)
    client = ClientHandshake(local_key, server_key.public_key(), first.new_ticket)
    responder = ServerHandshake(server_key, peers_for(local_key), store)
    flight = client.receive(responder.start())
    assert client.keys is not None and not client.done
    finished = responder.receive(flight)
    assert responder.done and responder.keys is not None
    assert finished[2] == hs.SERVER_FINISHED and len(finished) == 3 + hs.MAC_SIZE
    client.receive(finished)
    assert _finished(client) and client.keys.send == responder.keys.receive


def _finished(state: ClientHandshake) -> bool:
    return state.done  # read through a call: mypy keeps the value narrowed from earlier


@pytest.mark.parametrize("part", ["server_hello", "server_finished"])
def test_tampered_resumed_server_messages_are_refused(
    local_key: RsaKey, server_key: RsaKey, part: str
) -> None:
    store = TicketStore(3600)
    first, _ = handshake(local_key, server_key, store)
    start, end = (4, 4 + 64) if part == "server_hello" else (3, 3 + hs.MAC_SIZE)
    for position in range(start, end, 7):
        client = ClientHandshake(local_key, server_key.public_key(), first.new_ticket)
        responder = ServerHandshake(server_key, peers_for(local_key), store)
        hello = bytearray(responder.start())
        if part == "server_hello":
            hello[position] ^= 0x04  # the nonce or the share: the transcripts now differ
            flight = client.receive(bytes(hello))
            with pytest.raises(AuthenticationError):
                responder.receive(flight)
        else:
            finished = bytearray(responder.receive(client.receive(bytes(hello))))
            finished[position] ^= 0x04
            with pytest.raises(AuthenticationError):
                client.receive(bytes(finished))
            assert not client.done
