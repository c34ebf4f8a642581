#!/usr/bin/env python3
"""Micro-benchmarks behind sockproxy's dependency choices (medians of timeit repeats).

    python3 bench/crypto_micro.py            # about a minute on the project's 2-core VM
    python3 bench/crypto_micro.py --quick    # fewer repeats, for a smoke test

What each row justifies:
- AES-256-GCM: the record layer seals many small records (one per 64-byte-cell batch, and a
  sealed cell count before each), so the cost of setting up one nonce matters more than bulk
  speed: pycryptodome builds a new GCM object per message, cryptography (OpenSSL) reuses a key.
- X25519 in both libraries: the handshake's ephemeral exchange (cryptography is used).
- utils.cells: the record layer as shipped (RecordSealer / RecordOpener), and the numpy cell
  framing against the obvious pure-Python per-cell loop written here.
- RSA-3072 PSS sign / verify (pycryptodome, as the handshake uses them), and the protocol v2
  handshake step by step (utils.handshake): the local's create_client_init, the server's
  consume_client_init for a stranger (the sealed header does not open: one X25519
  operation, the whole cost of a probe) and for a genuine local (plus a signature check),
  create_server_response (the one private-key operation), consume_server_response.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import struct
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Crypto
import cryptography
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol import DH
from Crypto.PublicKey import ECC, RSA
from Crypto.Signature import pss
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from utils.cells import (
    CELL_SIZE,
    CELL_VERSION,
    MAX_CELL_PAYLOAD,
    MAX_RECORD_PAYLOAD,
    RecordOpener,
    RecordSealer,
    cell_count,
    pack_cells,
    unpack_cells,
)
from utils.errors import SockproxyError
from utils.handshake import (
    AuthorizedPeer,
    ClientHandshake,
    ServerHandshake,
    ServerPublic,
    server_secret,
)
from utils.keys import fingerprint_bytes

KEY = bytes(range(32))
NONCE = bytes(12)


def measure(func: Callable[[], object], repeat: int, min_time: float) -> float:
    """Median seconds per call over ``repeat`` timeit runs of an auto-ranged loop count."""
    timer = timeit.Timer(func)
    number = 1
    while True:  # like Timer.autorange, but to ``min_time`` per run
        if timer.timeit(number) >= min_time:
            break
        number *= 2
    return statistics.median(t / number for t in timer.repeat(repeat, number))


# ------------------------------------------------------------------------------ naive cells


def naive_pack(payload: bytes, randomness: bytes) -> bytes:
    """The obvious per-cell loop, for comparison with utils.cells.pack_cells."""
    out = bytearray()
    for index, start in enumerate(range(0, len(payload), MAX_CELL_PAYLOAD)):
        chunk = payload[start : start + MAX_CELL_PAYLOAD]
        cell = bytearray(randomness[index * CELL_SIZE : (index + 1) * CELL_SIZE])
        span = CELL_SIZE - 4 - len(chunk) + 1
        offset = 4 + ((cell[0] | cell[1] << 8) * span >> 16)
        cell[0:4] = bytes((offset, len(chunk), CELL_VERSION, 0))
        cell[offset : offset + len(chunk)] = chunk
        out += cell
    return bytes(out)


def naive_unpack(cells: bytes) -> bytes:
    parts = []
    for start in range(0, len(cells), CELL_SIZE):
        offset, length, version, reserved = struct.unpack_from("4B", cells, start)
        if version != CELL_VERSION or reserved or not 4 <= offset <= CELL_SIZE - length:
            raise ValueError("malformed cell")
        parts.append(cells[start + offset : start + offset + length])
    return b"".join(parts)


# ------------------------------------------------------------------------------ benchmarks


Row = tuple[str, str, str]  # what, figure, comment


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def mbps(size: int, seconds: float) -> str:
    return f"{size / seconds / 1e6:.0f} MB/s"


def aes_gcm_rows(repeat: int, min_time: float) -> list[Row]:
    small, bulk = os.urandom(64), os.urandom(64 * 1024)
    aead = AESGCM(KEY)

    def dome(data: bytes) -> Callable[[], object]:
        return lambda: AES.new(KEY, AES.MODE_GCM, nonce=NONCE).encrypt_and_digest(data)

    def ossl_new(data: bytes) -> Callable[[], object]:
        return lambda: AESGCM(KEY).encrypt(NONCE, data, None)

    def ossl(data: bytes) -> Callable[[], object]:
        return lambda: aead.encrypt(NONCE, data, None)

    t = {
        name: measure(fn, repeat, min_time)
        for name, fn in (
            ("dome64", dome(small)),
            ("ossl_new64", ossl_new(small)),
            ("ossl64", ossl(small)),
            ("dome_bulk", dome(bulk)),
            ("ossl_bulk", ossl(bulk)),
        )
    }
    return [
        ("AES-256-GCM 64 B, pycryptodome: AES.new(GCM) + encrypt_and_digest", us(t["dome64"]), ""),
        ("AES-256-GCM 64 B, cryptography: AESGCM(key) + encrypt", us(t["ossl_new64"]), ""),
        (
            "AES-256-GCM 64 B, cryptography: reused AESGCM.encrypt (as RecordSealer)",
            us(t["ossl64"]),
            f"{t['dome64'] / t['ossl64']:.0f}x faster than pycryptodome",
        ),
        ("AES-256-GCM 64 KiB seal, pycryptodome", mbps(len(bulk), t["dome_bulk"]), ""),
        (
            "AES-256-GCM 64 KiB seal, cryptography",
            mbps(len(bulk), t["ossl_bulk"]),
            f"{t['dome_bulk'] / t['ossl_bulk']:.1f}x pycryptodome",
        ),
    ]


def x25519_rows(repeat: int, min_time: float) -> list[Row]:
    peer_ossl = X25519PrivateKey.generate().public_key()
    peer_dome = ECC.generate(curve="curve25519").public_key()

    def ossl() -> bytes:
        return X25519PrivateKey.generate().exchange(peer_ossl)

    def dome() -> bytes:
        mine = ECC.generate(curve="curve25519")
        secret: bytes = DH.key_agreement(eph_priv=mine, eph_pub=peer_dome, kdf=lambda x: x)
        return secret

    t_ossl, t_dome = measure(ossl, repeat, min_time), measure(dome, repeat, min_time)
    return [
        ("X25519 keygen + exchange, pycryptodome", us(t_dome), ""),
        (
            "X25519 keygen + exchange, cryptography (as the handshake)",
            us(t_ossl),
            f"{t_dome / t_ossl:.0f}x faster",
        ),
    ]


def record_rows(repeat: int, min_time: float) -> list[Row]:
    big, one = os.urandom(100_000), b"x"
    sealer = RecordSealer(KEY)

    def seal(payload: bytes) -> Callable[[], object]:
        return lambda: sealer.seal(payload)

    # Each opener needs records sealed in its own nonce order, so seal a fresh run per call.
    def opener_loop(payload: bytes, count: int) -> tuple[Callable[[], object], int]:
        wire_sealer = RecordSealer(KEY)
        wire = [wire_sealer.seal(payload) for _ in range(count)]

        def feed_all() -> None:
            opener = RecordOpener(KEY)
            for record in wire:
                opener.feed(record)

        return feed_all, count

    t_seal_big = measure(seal(big), repeat, min_time)
    t_seal_one = measure(seal(one), repeat, min_time)
    feed_big, n_big = opener_loop(big, 20)
    feed_one, n_one = opener_loop(one, 2000)
    t_feed_big = measure(feed_big, repeat, min_time) / n_big
    t_feed_one = measure(feed_one, repeat, min_time) / n_one
    return [
        ("RecordSealer.seal, 100 KB payload", mbps(len(big), t_seal_big), ""),
        ("RecordOpener.feed, 100 KB payload", mbps(len(big), t_feed_big), ""),
        ("RecordSealer.seal, 1 B payload", us(t_seal_one), "2 GCM seals + 1 cell"),
        ("RecordOpener.feed, 1 B payload", us(t_feed_one), ""),
    ]


def cell_rows(repeat: int, min_time: float) -> list[Row]:
    payload = os.urandom(MAX_RECORD_PAYLOAD)  # one full record: 2048 cells
    randomness = os.urandom(cell_count(len(payload)) * CELL_SIZE)
    cells = bytes(pack_cells(payload, randomness))
    if naive_pack(payload, randomness) != cells or naive_unpack(cells) != payload:
        raise SystemExit("naive cell loop disagrees with utils.cells")
    t = {
        "pack": measure(lambda: pack_cells(payload, randomness), repeat, min_time),
        "naive_pack": measure(lambda: naive_pack(payload, randomness), repeat, min_time),
        "unpack": measure(lambda: unpack_cells(cells), repeat, min_time),
        "naive_unpack": measure(lambda: naive_unpack(cells), repeat, min_time),
    }
    size = len(payload)
    return [
        (
            "pack_cells, 102,400 B (numpy)",
            mbps(size, t["pack"]),
            f"{t['naive_pack'] / t['pack']:.0f}x the loop",
        ),
        ("per-cell Python loop, pack", mbps(size, t["naive_pack"]), ""),
        (
            "unpack_cells, 102,400 B (numpy)",
            mbps(size, t["unpack"]),
            f"{t['naive_unpack'] / t['unpack']:.0f}x the loop",
        ),
        ("per-cell Python loop, unpack", mbps(size, t["naive_unpack"]), ""),
    ]


def rsa_rows(repeat: int, min_time: float, bits: int) -> tuple[list[Row], list[Row]]:
    local, server = RSA.generate(bits), RSA.generate(bits)
    digest = SHA256.new(b"transcript")
    signature = pss.new(local).sign(digest)
    t_sign = measure(lambda: pss.new(local).sign(digest), repeat, min_time)
    t_verify = measure(
        lambda: pss.new(local.public_key()).verify(digest, signature), repeat, min_time
    )
    rsa = [
        (f"RSA-{bits} PSS sign (pycryptodome)", ms(t_sign), "a private-key operation"),
        (f"RSA-{bits} PSS verify (pycryptodome)", ms(t_verify), ""),
    ]
    return rsa, handshake_rows(repeat, min_time, local, server)


def handshake_rows(
    repeat: int, min_time: float, local: RSA.RsaKey, server: RSA.RsaKey
) -> list[Row]:
    """The v2 handshake, one message at a time (in memory, both sides in this process)."""
    secret = server_secret(server)
    public = ServerPublic(server.public_key(), secret.static.share)
    peers = {fingerprint_bytes(local): AuthorizedPeer("bench", local.public_key())}
    early = b"\x01" + bytes(6) + b"\x08" + bytes(8)  # an OPEN-sized frame
    genuine = ClientHandshake(local, public).create_client_init(early)
    probe = os.urandom(len(genuine))

    def create() -> bytes:
        return ClientHandshake(local, public).create_client_init(early)

    def stranger() -> None:
        try:
            ServerHandshake(secret, peers).consume_client_init(probe)
        except SockproxyError:
            return
        raise SystemExit("random bytes opened as a ClientInit")

    def consume() -> ServerHandshake:
        responder = ServerHandshake(secret, peers)
        if responder.consume_client_init(genuine) is None:
            raise SystemExit("a genuine ClientInit did not authenticate")
        return responder

    def respond() -> bytes:
        return consume().create_server_response()

    def whole() -> None:
        client = ClientHandshake(local, public)
        responder = ServerHandshake(secret, peers)
        responder.consume_client_init(client.create_client_init(early))
        if client.consume_server_response(responder.create_server_response()) is None:
            raise SystemExit("handshake did not complete")

    def fixed() -> ClientHandshake:
        """The same ClientInit every time (fixed randomness and clock): one response fits."""
        return ClientHandshake(local, public, rng=random.Random(1).randbytes, clock=lambda: 1e9)

    responder = ServerHandshake(secret, peers)
    responder.consume_client_init(fixed().create_client_init(early))
    response = responder.create_server_response()

    def create_fixed() -> ClientHandshake:
        client = fixed()
        client.create_client_init(early)
        return client

    def finish(count: int = 50) -> float:
        """Seconds per consume_server_response (the clients made beforehand, untimed)."""
        clients = [create_fixed() for _ in range(count)]
        started = time.perf_counter()
        for client in clients:
            if client.consume_server_response(response) is None:
                raise SystemExit("the response did not complete the handshake")
        return (time.perf_counter() - started) / count

    t = {
        name: measure(fn, repeat, min_time)
        for name, fn in (
            ("create", create),
            ("stranger", stranger),
            ("consume", consume),
            ("respond", respond),
            ("whole", whole),
        )
    }
    return [
        ("local: create_client_init (X25519, RSA sign)", ms(t["create"]), ""),
        (
            "server: consume_client_init, a stranger's bytes",
            us(t["stranger"]),
            "header does not open: the whole cost of a probe",
        ),
        ("server: consume_client_init, genuine (X25519, RSA verify)", ms(t["consume"]), ""),
        (
            "server: create_server_response (X25519, RSA sign)",
            ms(t["respond"] - t["consume"]),
            "the one private-key operation",
        ),
        (
            "local: consume_server_response (RSA verify, X25519)",
            ms(statistics.median(finish() for _ in range(repeat))),
            "",
        ),
        ("whole handshake, both sides, in memory", ms(t["whole"]), ""),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    p.add_argument("--bits", type=int, default=3072, help="RSA key size [3072]")
    args = p.parse_args(argv)
    repeat, min_time = (3, 0.02) if args.quick else (7, 0.2)
    print(
        f"# crypto micro-benchmarks: Python {platform.python_version()}, "
        f"pycryptodome {Crypto.__version__}, cryptography {cryptography.__version__}, "
        f"{os.cpu_count()} CPU(s); median of {repeat} timeit runs of >= {min_time} s each\n"
    )
    rows: list[Row] = []
    sections: list[tuple[str, Callable[[], list[Row]]]] = [
        ("AES-256-GCM", lambda: aes_gcm_rows(repeat, min_time)),
        ("X25519", lambda: x25519_rows(repeat, min_time)),
        ("record layer", lambda: record_rows(repeat, min_time)),
        ("cells", lambda: cell_rows(repeat, min_time)),
    ]
    for name, section in sections:
        print(f"[crypto_micro] {name}...", file=sys.stderr, flush=True)
        rows += section()
    print("[crypto_micro] RSA and handshakes...", file=sys.stderr, flush=True)
    rsa, shakes = rsa_rows(repeat, min_time, args.bits)
    rows += rsa + shakes
    print("| operation | median | note |")
    print("| --- | ---: | --- |")
    for what, figure, note in rows:
        print(f"| {what} | {figure} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
