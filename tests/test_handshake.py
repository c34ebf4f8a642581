"""The v2 handshake state machines: success, strangers, tampering, every wrong key."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vectors import Drbg, vector_key
from utils.crypto import RsaKey, rsa_sign, static_x25519
from utils.errors import AuthenticationError, ProtocolError, SockproxyError
from utils.handshake import (
    INIT_HEAD_SIZE,
    AuthorizedPeer,
    ClientHandshake,
    ClientState,
    ServerHandshake,
    ServerPublic,
    ServerSecret,
    ServerState,
    UnknownKey,
)
from utils.keys import fingerprint_bytes

NOW = 1_800_000_000.0


class Signer:
    """The server's signer, counting its private-key operations as the server does."""

    def __init__(self, key: RsaKey) -> None:
        self.key = key
        self.calls = 0

    def __call__(self, message: bytes) -> bytes:
        self.calls += 1
        return rsa_sign(self.key, message)


@pytest.fixture(scope="module")
def local_key() -> RsaKey:
    return vector_key("local")


@pytest.fixture(scope="module")
def server_key() -> RsaKey:
    return vector_key("server")


@pytest.fixture(scope="module")
def stranger_key() -> RsaKey:
    return vector_key("stranger")


def public_of(server: RsaKey) -> ServerPublic:
    return ServerPublic(server.public_key(), static_x25519(server).share)


def responder(server: RsaKey, *authorized: RsaKey) -> tuple[ServerHandshake, Signer]:
    signer = Signer(server)
    peers = {fingerprint_bytes(k): AuthorizedPeer(f"key{i}", k.public_key()) for i, k in
             enumerate(authorized)}  # fmt: skip
    return ServerHandshake(ServerSecret(static_x25519(server), signer), peers), signer


def client_for(local: RsaKey, server: ServerPublic) -> ClientHandshake:
    return ClientHandshake(local, server, clock=lambda: NOW)


def test_handshake_agrees_on_keys_and_carries_early_data(
    local_key: RsaKey, server_key: RsaKey
) -> None:
    client = client_for(local_key, public_of(server_key))
    server, signer = responder(server_key, local_key)
    init = server.consume_client_init(client.create_client_init(b"\x01early"))
    assert init is not None
    assert (init.peer.name, init.early, init.timestamp_ms) == ("key0", b"\x01early", NOW * 1000)
    assert server.state.name == "AUTHENTICATED" and signer.calls == 0
    keys = client.consume_server_response(server.create_server_response())
    assert keys is not None and server.keys is not None
    assert (keys.send, keys.receive) == (server.keys.receive, server.keys.send)
    assert keys.send != keys.receive
    assert client.state is ClientState.ESTABLISHED and server.state is ServerState.ESTABLISHED
    assert signer.calls == 1


def test_byte_at_a_time_and_trailing_records(local_key: RsaKey, server_key: RsaKey) -> None:
    client = client_for(local_key, public_of(server_key))
    server, _ = responder(server_key, local_key)
    wire = client.create_client_init() + b"records"
    results = [server.consume_client_init(wire[i : i + 1]) for i in range(len(wire) - 7)]
    assert all(r is None for r in results[:-1]) and results[-1] is not None
    assert server.bytes_wanted() == 0
    server_bytes = server.create_server_response() + b"more"
    assert server.consume_client_init is not None
    for i in range(len(server_bytes) - 5):
        assert client.consume_server_response(server_bytes[i : i + 1]) is None
    assert client.consume_server_response(server_bytes[-5:]) is not None
    assert client.trailing_data() == b"more"


def test_every_connection_looks_different(local_key: RsaKey, server_key: RsaKey) -> None:
    first = client_for(local_key, public_of(server_key)).create_client_init(b"x")
    second = client_for(local_key, public_of(server_key)).create_client_init(b"x")
    assert first[:90] != second[:90] and len({len(first), len(second)}) >= 1
    assert fingerprint_bytes(local_key) not in first  # the identity never travels in clear


def test_stranger_without_the_server_key_fails_at_the_header(
    local_key: RsaKey, server_key: RsaKey, stranger_key: RsaKey
) -> None:
    """Sealed to another server's static key: one X25519 operation, then silence."""
    client = client_for(local_key, public_of(stranger_key))
    server, signer = responder(server_key, local_key)
    wire = client.create_client_init()
    assert server.consume_client_init(wire[: INIT_HEAD_SIZE - 1]) is None
    with pytest.raises(AuthenticationError, match="header does not open"):
        server.consume_client_init(wire[INIT_HEAD_SIZE - 1 : INIT_HEAD_SIZE])
    assert signer.calls == 0


def test_unknown_key_is_named_by_its_fingerprint(
    local_key: RsaKey, server_key: RsaKey, stranger_key: RsaKey
) -> None:
    client = client_for(stranger_key, public_of(server_key))
    server, signer = responder(server_key, local_key)
    with pytest.raises(UnknownKey) as caught:
        server.consume_client_init(client.create_client_init())
    assert caught.value.fingerprint == fingerprint_bytes(stranger_key)
    assert signer.calls == 0


def test_local_refuses_an_impostor_server(
    local_key: RsaKey, server_key: RsaKey, stranger_key: RsaKey
) -> None:
    """A server that holds the static key but signs with another RSA key is refused."""
    client = client_for(local_key, ServerPublic(stranger_key.public_key(),
                                                static_x25519(server_key).share))  # fmt: skip
    server, _ = responder(server_key, local_key)
    server.consume_client_init(client.create_client_init())
    with pytest.raises(AuthenticationError, match="signature"):
        client.consume_server_response(server.create_server_response())


@pytest.mark.parametrize("position", [0, 31, 32, 63, 64, 80, 89, 90, 200, -17, -1])
def test_any_flipped_bit_in_the_client_init_is_refused(
    local_key: RsaKey, server_key: RsaKey, position: int
) -> None:
    wire = bytearray(client_for(local_key, public_of(server_key)).create_client_init(b"e"))
    wire[position] ^= 1
    server, signer = responder(server_key, local_key)
    with pytest.raises((AuthenticationError, ProtocolError)):
        assert server.consume_client_init(bytes(wire)) is None
        server.consume_client_init(bytes(64 * 1024))  # a longer body claimed: still fails
    assert signer.calls == 0


@pytest.mark.parametrize("position", [0, 17, 18, 40, -1])
def test_any_flipped_bit_in_the_server_response_is_refused(
    local_key: RsaKey, server_key: RsaKey, position: int
) -> None:
    client = client_for(local_key, public_of(server_key))
    server, _ = responder(server_key, local_key)
    server.consume_client_init(client.create_client_init())
    wire = bytearray(server.create_server_response())
    wire[position] ^= 0x80
    with pytest.raises((AuthenticationError, ProtocolError)):
        assert client.consume_server_response(bytes(wire)) is None
        client.consume_server_response(bytes(64 * 1024))


def test_messages_out_of_order_are_refused(local_key: RsaKey, server_key: RsaKey) -> None:
    client = client_for(local_key, public_of(server_key))
    server, _ = responder(server_key, local_key)
    with pytest.raises(ProtocolError):
        client.consume_server_response(b"x")
    with pytest.raises(ProtocolError):
        server.create_server_response()
    client.create_client_init()
    with pytest.raises(ProtocolError):
        client.create_client_init()


def test_early_data_limit(local_key: RsaKey, server_key: RsaKey) -> None:
    with pytest.raises(ValueError, match="early data"):
        client_for(local_key, public_of(server_key)).create_client_init(bytes(16385))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_random_bytes_only_ever_raise_protocol_errors(data: bytes) -> None:
    server, signer = responder(vector_key("server"), vector_key("local"))
    try:
        assert server.consume_client_init(data) is None
    except SockproxyError:
        pass
    assert signer.calls == 0


def test_fixed_randomness_gives_fixed_bytes(local_key: RsaKey, server_key: RsaKey) -> None:
    def init() -> bytes:
        client = ClientHandshake(local_key, public_of(server_key), rng=Drbg(b"t"),
                                 clock=lambda: NOW)  # fmt: skip
        return client.create_client_init(b"early")

    assert init() == init()
