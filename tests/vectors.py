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
from utils.handshake import (
    AuthorizedPeer,
    ClientHandshake,
    ServerHandshake,
    TicketStore,
    key_fingerprint,
)

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


def run_handshakes() -> dict[str, bytes]:
    """A full handshake, then a resumed one with its ticket; every byte on the wire."""
    local, server = vector_key("local"), vector_key("server")
    store = TicketStore(3600, clock=lambda: 0.0)
    peers = {key_fingerprint(local): AuthorizedPeer("local", local.public_key())}
    out: dict[str, bytes] = {}
    ticket = None
    for kind in ("full", "resumed"):
        client = ClientHandshake(
            local,
            server.public_key(),
            ticket,
            rng=Drbg(f"{kind} client".encode()),
            clock=lambda: 0.0,
        )
        responder = ServerHandshake(server, peers, store, rng=Drbg(f"{kind} server".encode()))
        server_hello = responder.start()
        client_messages = client.receive(server_hello)
        server_messages = responder.receive(client_messages)
        client.receive(server_messages)
        assert client.keys is not None and responder.keys is not None
        assert client.keys.send == responder.keys.receive
        out[f"{kind}_server_hello"] = server_hello
        out[f"{kind}_client_messages"] = client_messages
        out[f"{kind}_server_messages"] = server_messages
        out[f"{kind}_key_local_to_server"] = client.keys.send
        out[f"{kind}_key_server_to_local"] = client.keys.receive
        if kind == "full":
            assert client.new_ticket is not None
            ticket = client.new_ticket
            out["full_ticket_id"] = ticket.ticket_id
            out["full_resumption_secret"] = ticket.secret
    return out


def handshake_vectors() -> dict[str, str]:
    raw = run_handshakes()
    shown: dict[str, str] = {}
    for name, value in raw.items():
        # RSA-sized messages are long: the document gives their SHA-256 instead.
        if len(value) > 256:
            shown[f"sha256({name})"] = hashlib.sha256(value).hexdigest()
        else:
            shown[name] = value.hex()
    return shown


def all_vectors() -> dict[str, str]:
    return {**cell_vectors(), **record_vectors(), **handshake_vectors()}


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
