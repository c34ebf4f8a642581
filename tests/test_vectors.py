"""docs/PROTOCOL.md's test vectors: the document, the code and an independent reading agree.

The independent reading redoes section 2's key schedule from the document's formulas with
plain ``cryptography``/pycryptodome calls (not through utils.handshake), knowing only what
the vectors' parties know.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from Crypto.Hash import SHA256
from Crypto.Signature import pss
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.vectors import (
    VECTOR_TIME,
    Drbg,
    all_vectors,
    documented_vectors,
    early_data,
    run_handshakes,
    vector_key,
)
from utils.crypto import hkdf


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
    """Section 5 of PROTOCOL.md, implemented again from the table, not from utils.cells."""
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


def test_frame_vectors_follow_the_table() -> None:
    documented = documented_vectors()
    kinds = {
        "frame_open": 1, "frame_reply": 2, "frame_data": 3, "frame_window": 4, "frame_eof": 5,
        "frame_reset": 6, "frame_ping": 7, "frame_pong": 8, "frame_goaway": 9,
    }  # fmt: skip
    for name, kind in kinds.items():
        frame = bytes.fromhex(documented[name])
        frame_type, stream, length = struct.unpack(">BIH", frame[:7])
        assert (frame_type, len(frame) - 7) == (kind, length), name
        assert stream == (0 if kind >= 7 else 1), name
    assert bytes.fromhex(documented["frame_data"])[7:] == b"GET / HTTP/1.0\r\n\r\n"
    assert bytes.fromhex(documented["frame_window"])[7:] == (262144).to_bytes(4, "big")


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = hkdf(ikm, salt, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_matches_rfc5869_test_case_3_without_salt() -> None:
    okm = hkdf(bytes.fromhex("0b" * 22), b"", b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def _hkdf(ikm: bytes, salt: bytes, info: bytes, size: int) -> bytes:
    """RFC 5869 again, straight from the RFC (salt of zeros when absent)."""
    prk = hmac.new(salt or bytes(32), ikm, "sha256").digest()
    out, block, counter = b"", b"", 1
    while len(out) < size:
        block = hmac.new(prk, block + info + bytes((counter,)), "sha256").digest()
        out += block
        counter += 1
    return out[:size]


def _sha(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def _x25519_share(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_handshake_follows_the_document_read_independently() -> None:
    """Section 2, step by step, from the vector bytes and the documented formulas."""
    raw = run_handshakes()
    local, server = vector_key("local"), vector_key("server")
    # The server's static key: HKDF of the RSA private exponent.
    d = int(server.d)
    s_private = _hkdf(d.to_bytes((d.bit_length() + 7) // 8, "big"), b"",
                      b"sockproxy v2 static x25519", 32)  # fmt: skip
    static = _x25519_share(s_private)
    assert static == raw["server_static_share"]
    # The local's ephemeral key is the first 32 bytes of its randomness; R the next 32.
    client_rng = Drbg(b"client")
    e_private, random = client_rng(32), client_rng(32)
    e_public = _x25519_share(e_private)
    init = raw["client_init"]
    assert init[:32] == random
    mask = _hkdf(static, random, b"sockproxy v2 mask", 32)
    assert bytes(a ^ b for a, b in zip(init[32:64], mask, strict=True)) == e_public
    es = X25519PrivateKey.from_private_bytes(e_private).exchange(
        X25519PublicKey.from_public_bytes(static)
    )
    h0 = _sha(b"sockproxy v2", static, random, e_public)
    keys = _hkdf(es, h0, b"sockproxy v2 init keys", 64)
    k_init, k_response = AESGCM(keys[:32]), AESGCM(keys[32:])
    header = k_init.decrypt(bytes(12), init[64:90], init[:64])
    timestamp_ms, body_length = struct.unpack(">QH", header)
    assert timestamp_ms == int(VECTOR_TIME * 1000) and len(init) == 90 + body_length
    body = k_init.decrypt(bytes(11) + b"\x01", init[90:], None)
    fingerprint = body[:32]
    assert fingerprint == _sha(local.public_key().export_key(format="DER"))
    sig_length = int.from_bytes(body[32:34], "big")
    signature = body[34 : 34 + sig_length]
    signed = b"sockproxy v2 client signature\x00" + h0 + header + fingerprint
    pss.new(local.public_key()).verify(SHA256.new(signed), signature)
    early_length = int.from_bytes(body[34 + sig_length : 36 + sig_length], "big")
    assert body[36 + sig_length : 36 + sig_length + early_length] == early_data()
    # The ServerResponse: a sealed 2-byte length, then the sealed body.
    response = raw["server_response"]
    (length,) = struct.unpack(">H", k_response.decrypt(bytes(12), response[:18], None))
    assert len(response) == 18 + length
    reply = k_response.decrypt(bytes(11) + b"\x01", response[18:], None)
    f_public, flags = reply[:32], reply[32]
    assert flags == 0  # the server acts on the early data at once
    server_sig = reply[35 : 35 + int.from_bytes(reply[33:35], "big")]
    signed = b"sockproxy v2 server signature\x00" + _sha(init) + f_public + bytes((flags,))
    pss.new(server.public_key()).verify(SHA256.new(signed), server_sig)
    ee = X25519PrivateKey.from_private_bytes(e_private).exchange(
        X25519PublicKey.from_public_bytes(f_public)
    )
    traffic = _hkdf(es + ee, _sha(init, response), b"sockproxy v2 traffic keys", 64)
    assert traffic[:32] == raw["key_local_to_server"]
    assert traffic[32:] == raw["key_server_to_local"]


def test_vectors_are_deterministic() -> None:
    assert all_vectors() == all_vectors()
