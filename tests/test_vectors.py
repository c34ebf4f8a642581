"""docs/PROTOCOL.md's test vectors: the document, the code and an independent reading agree."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.vectors import (
    all_vectors,
    documented_vectors,
    run_handshakes,
)
from utils.handshake import hkdf_sha256


def test_document_lists_every_vector_and_each_matches_the_code() -> None:
    documented = documented_vectors()
    computed = all_vectors()
    assert set(documented) == set(computed)
    for name, value in computed.items():
        assert documented[name] == value, name


def test_documented_vectors_parser_reads_blocks_only() -> None:
    text = "x = 1\n```vectors\na = 01\nb = ff\n```\n```\nc = 02\n```\n"
    assert documented_vectors(text) == {"a": "01", "b": "ff"}


def _read_cells(cells: bytes) -> bytes:
    """Section 4 of PROTOCOL.md, implemented again from the table, not from utils.cells."""
    payload = b""
    for start in range(0, len(cells), 64):
        offset, length, version, reserved = cells[start : start + 4]
        assert version == 1 and reserved == 0
        assert 4 <= offset <= 64 - length and 1 <= length <= 50
        payload += cells[start + offset : start + offset + length]
    return payload


def test_record_vectors_open_with_plain_aes_gcm() -> None:
    documented = documented_vectors()
    aead = AESGCM(bytes.fromhex(documented["record_key"]))
    nonce = 0
    for name, expected in (("record_hello", b"hello"), ("record_second", b"world!")):
        wire = bytes.fromhex(documented[name])
        count = int.from_bytes(aead.decrypt(nonce.to_bytes(12, "big"), wire[:18], None), "big")
        assert count == 1
        cells = aead.decrypt((nonce + 1).to_bytes(12, "big"), wire[18:], None)
        assert len(cells) == 64
        assert _read_cells(cells) == expected
        nonce += 2
    end = aead.decrypt(nonce.to_bytes(12, "big"), bytes.fromhex(documented["record_end"]), None)
    assert end == b"\x00\x00"


def test_cell_vectors_follow_the_table() -> None:
    documented = documented_vectors()
    assert _read_cells(bytes.fromhex(documented["cell_hello"])) == b"hello"
    assert _read_cells(bytes.fromhex(documented["cells_60_bytes"])) == bytes(range(60))


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = hkdf_sha256(ikm, salt, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_matches_rfc5869_test_case_3_without_salt() -> None:
    okm = hkdf_sha256(bytes.fromhex("0b" * 22), b"", b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_resumed_handshake_macs_follow_the_document() -> None:
    """Recompute ClientFinished from the documented formula and the vector bytes."""
    raw = run_handshakes()
    binder = hkdf_sha256(raw["full_resumption_secret"], b"", b"sockproxy v1 binder", 32)
    hello = raw["resumed_server_hello"]
    client = raw["resumed_client_messages"]
    resume_hello_size = 2 + int.from_bytes(client[:2], "big")
    resume_hello = client[:resume_hello_size]
    label = b"sockproxy v1 client finished\x00"
    mac = hmac.new(binder, label + hashlib.sha256(hello + resume_hello).digest(), "sha256")
    finished = client[resume_hello_size:]
    assert finished[:3] == b"\x00\x21\x07"
    assert finished[3:] == mac.digest()


@pytest.mark.parametrize("name", ["full_ticket_id", "resumed_key_local_to_server"])
def test_vectors_are_deterministic(name: str) -> None:
    assert all_vectors()[name] == all_vectors()[name]
