"""Test vectors for docs/PROTOCOL.md: fixed keys and randomness in, exact bytes out.

Nothing here is secret: the RSA keys are generated from a public seed, so no private key
file is shipped. `python3 -m tests.vectors` prints the block that PROTOCOL.md carries;
tests/test_vectors.py checks that the document and the code agree.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path

from Crypto.PublicKey import RSA
from Crypto.PublicKey.RSA import RsaKey

from utils.cells import RecordSealer, pack_cells
from utils.crypto import rsa_sign, static_x25519
from utils.handshake import (
    AuthorizedPeer,
    ClientHandshake,
    ServerHandshake,
    ServerPublic,
    ServerSecret,
)
from utils.keys import fingerprint_bytes
from utils.mux import (
    data_frames,
    eof_frame,
    goaway_frame,
    open_frame,
    ping_frame,
    reply_frame,
    reset_frame,
    window_frame,
)
from utils.socks5 import Address, Reply, Request, encode_tunnel_reply, encode_tunnel_request

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


class Drbg:
    """Deterministic bytes: SHA-256(label || 8-byte counter) blocks, concatenated."""

    def __init__(self, label: bytes) -> None:
        self._label = label
        self._counter = 0
        self._buffer = b""

    def __call__(self, size: int) -> bytes:
        while len(self._buffer) < size:
            block = self._label + self._counter.to_bytes(8, "big")
            self._buffer += hashlib.sha256(block).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


@cache
def vector_key(name: str) -> RsaKey:
    """A 2048-bit RSA key from the public seed ``sockproxy test vector <name>``."""
    return RSA.generate(2048, randfunc=Drbg(b"sockproxy test vector " + name.encode()))


def cell_vectors() -> dict[str, str]:
    randomness = Drbg(b"cell padding")(64 * 2)
    one = pack_cells(b"hello", randomness[:64])
    two = pack_cells(bytes(range(60)), randomness)
    return {"cell_hello": one.hex(), "cells_60_bytes": two.hex()}


def record_vectors() -> dict[str, str]:
    key = bytes(range(32))
    sealer = RecordSealer(key, padding=Drbg(b"record padding"))
    return {
        "record_key": key.hex(),
        "record_hello": sealer.seal(b"hello").hex(),
        "record_second": sealer.seal(b"world!").hex(),
        "record_end": sealer.seal_end().hex(),
    }


VECTOR_TIME = 1_800_000_000.0  # the ClientInit's clock: 2027-01-15 08:00:00 UTC
VECTOR_REQUEST = Request(1, Address("example.com", 80))


def early_data() -> bytes:
    """What the vector ClientInit carries: OPEN of stream 1 for example.com:80."""
    return open_frame(1, encode_tunnel_request(VECTOR_REQUEST))


def run_handshakes() -> dict[str, bytes]:
    """One handshake with fixed keys and randomness: every byte on the wire, and the keys."""
    local, server = vector_key("local"), vector_key("server")
    static = static_x25519(server)
    peers = {fingerprint_bytes(local): AuthorizedPeer("local", local.public_key())}
    client = ClientHandshake(
        local,
        ServerPublic(server.public_key(), static.share),
        rng=Drbg(b"client"),
        clock=lambda: VECTOR_TIME,
    )
    signing_rng = Drbg(b"server signature")
    secret = ServerSecret(static, lambda message: rsa_sign(server, message, signing_rng))
    responder = ServerHandshake(secret, peers, rng=Drbg(b"server"))
    client_init = client.create_client_init(early_data())
    init = responder.consume_client_init(client_init)
    assert init is not None and init.early == early_data()
    response = responder.create_server_response()
    keys = client.consume_server_response(response)
    assert keys is not None and responder.keys is not None
    assert keys.send == responder.keys.receive and keys.receive == responder.keys.send
    return {
        "server_static_share": static.share,
        "client_init": client_init,
        "server_response": response,
        "key_local_to_server": keys.send,
        "key_server_to_local": keys.receive,
    }


def frame_vectors() -> dict[str, str]:
    bind = Address("192.0.2.7", 40000)
    frames = {
        "frame_open": open_frame(1, encode_tunnel_request(VECTOR_REQUEST)),
        "frame_reply": reply_frame(1, encode_tunnel_reply(Reply.SUCCEEDED, bind)),
        "frame_data": data_frames(1, b"GET / HTTP/1.0\r\n\r\n"),
        "frame_window": window_frame(1, 262144),
        "frame_eof": eof_frame(1),
        "frame_reset": reset_frame(1),
        "frame_ping": ping_frame(bytes(range(8))),
        "frame_pong": ping_frame(bytes(range(8)), answer=True),
        "frame_goaway": goaway_frame(),
    }
    return {name: value.hex() for name, value in frames.items()}


def handshake_vectors() -> dict[str, str]:
    raw = run_handshakes()
    shown: dict[str, str] = {}
    shown["client_init_head"] = raw["client_init"][:90].hex()
    shown["server_response_head"] = raw["server_response"][:18].hex()
    for name, value in raw.items():
        # RSA-sized messages are long: the document gives their SHA-256 instead.
        if len(value) > 256:
            shown[f"sha256({name})"] = hashlib.sha256(value).hexdigest()
        else:
            shown[name] = value.hex()
    return shown


def all_vectors() -> dict[str, str]:
    return {**cell_vectors(), **record_vectors(), **frame_vectors(), **handshake_vectors()}


def documented_vectors(text: str | None = None) -> dict[str, str]:
    """The ``name = hex`` lines of every ```vectors block in PROTOCOL.md."""
    text = PROTOCOL_MD.read_text() if text is None else text
    found: dict[str, str] = {}
    for block in re.findall(r"```vectors\n(.*?)```", text, flags=re.DOTALL):
        for line in block.splitlines():
            if "=" in line:
                name, value = (part.strip() for part in line.split("=", 1))
                found[name] = value
    return found


if __name__ == "__main__":
    for vector_name, vector_value in all_vectors().items():
        print(f"{vector_name} = {vector_value}")
