"""Every cryptographic primitive sockproxy uses; the only module that imports a crypto library.

- AES-256-GCM (``Aead``) from ``cryptography`` (OpenSSL): 0.8 µs per 64-byte record where
  pycryptodome needs ~40 µs to set up a nonce (bench/crypto_micro.py).
- X25519 (``Ephemeral``, ``static_x25519``) from ``cryptography``.
- RSA keys and RSA-PSS signatures with SHA-256 from pycryptodome, the design's library;
  with the OS's randomness the signature and its check run in OpenSSL instead (RSA-3072
  sign 3.1 ms vs 9.0 ms, verify 0.07 vs 0.24 ms on this machine: the cold handshake signs
  twice), on a copy of the key made once per key, never per connection.
- HKDF-SHA256 and SHA-256 on the standard library's ``hmac``/``hashlib``.
- The padding stream: AES-256-CTR keystream under a random key, a fast CSPRNG.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable

from Crypto import IncorrectPassphraseError, KdfLimitError, PassphraseRequiredError
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.PublicKey.RSA import RsaKey
from Crypto.Signature import pss
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from utils.errors import AuthenticationError

__all__ = [
    "KEY_SIZE",
    "SHARE_SIZE",
    "TAG_SIZE",
    "Aead",
    "Ephemeral",
    "KeyImportError",
    "PaddingSource",
    "Random",
    "RsaKey",
    "generate_rsa",
    "hkdf",
    "import_rsa",
    "rsa_sign",
    "rsa_verify",
    "sha256",
    "static_x25519",
    "x25519_public",
]

KEY_SIZE = 32
TAG_SIZE = 16
SHARE_SIZE = 32
Random = Callable[[int], bytes]


def sha256(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def hkdf(ikm: bytes, salt: bytes, info: bytes, size: int) -> bytes:
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


class Aead:
    """AES-256-GCM under one key; ``open`` raises AuthenticationError on any forgery."""

    def __init__(self, key: bytes) -> None:
        self._aesgcm = AESGCM(key)

    def seal(self, nonce: bytes, plaintext: bytes | bytearray, ad: bytes | None = None) -> bytes:
        return self._aesgcm.encrypt(nonce, plaintext, ad)

    def seal_into(self, nonce: bytes, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Seal into ``out``, which is exactly ``len(plaintext) + TAG_SIZE`` bytes."""
        self._aesgcm.encrypt_into(nonce, plaintext, None, out)

    def open(
        self, nonce: bytes, sealed: bytes | bytearray | memoryview, ad: bytes | None = None
    ) -> bytes:
        try:
            return self._aesgcm.decrypt(nonce, sealed, ad)
        except InvalidTag:
            raise AuthenticationError("AEAD tag does not verify") from None

    def open_into(self, nonce: bytes, sealed: memoryview, out: memoryview) -> None:
        """Open into ``out``, which is exactly ``len(sealed) - TAG_SIZE`` bytes; on a forgery
        ``out`` holds no plaintext worth reading and AuthenticationError is raised."""
        try:
            self._aesgcm.decrypt_into(nonce, sealed, None, out)
        except InvalidTag:
            raise AuthenticationError("AEAD tag does not verify") from None


class Ephemeral:
    """An X25519 key pair: fresh per handshake (or a static one from fixed bytes)."""

    def __init__(self, rng: Random = os.urandom, private: bytes | None = None) -> None:
        if private is not None:
            self._private = X25519PrivateKey.from_private_bytes(private)
        elif rng is os.urandom:
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


STATIC_KEY_INFO = b"sockproxy v2 static x25519"


def static_x25519(rsa_private: RsaKey) -> Ephemeral:
    """The server's static X25519 key, derived from its RSA private key (no new key file).

    The private exponent is secret exactly as long as the RSA key is, so the X25519 key
    shares its fate: nothing new to store, rotate or protect.
    """
    d = int(rsa_private.d)
    secret = d.to_bytes((d.bit_length() + 7) // 8, "big")
    return Ephemeral(private=hkdf(secret, b"", STATIC_KEY_INFO, SHARE_SIZE))


def x25519_public(rsa_private: RsaKey) -> bytes:
    """The public half of ``static_x25519`` (what genkey writes next to the RSA public key)."""
    return static_x25519(rsa_private).share


_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_OPENSSL_KEYS: dict[int, tuple[RsaKey, rsa.RSAPrivateKey | rsa.RSAPublicKey]] = {}
_OPENSSL_LOCK = threading.Lock()


def _openssl(key: RsaKey) -> rsa.RSAPrivateKey | rsa.RSAPublicKey:
    """OpenSSL's copy of ``key``, made on first use (keys are loaded once and kept)."""
    with _OPENSSL_LOCK:
        held = _OPENSSL_KEYS.get(id(key))
        if held is None or held[0] is not key:
            if key.has_private():
                der = key.export_key(format="DER", pkcs=8)
                copy: rsa.RSAPrivateKey | rsa.RSAPublicKey = _private_der(der)
            else:
                copy = _public_der(key.export_key(format="DER"))
            held = _OPENSSL_KEYS[id(key)] = (key, copy)
        return held[1]


def _private_der(der: bytes) -> rsa.RSAPrivateKey:
    # pycryptodome imported (and checked) this key from our own file already; OpenSSL's
    # second check costs 188 ms for RSA-3072, on the first handshake of a fresh local.
    loaded = serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    return loaded


def _public_der(der: bytes) -> rsa.RSAPublicKey:
    loaded = serialization.load_der_public_key(der)
    assert isinstance(loaded, rsa.RSAPublicKey)
    return loaded


def rsa_sign(key: RsaKey, message: bytes, rng: Random = os.urandom) -> bytes:
    """RSA-PSS (SHA-256, MGF1-SHA256, 32-byte salt) over ``message``. Fixed randomness
    (the test vectors) takes pycryptodome, which accepts a random source."""
    if rng is os.urandom:
        signer = _openssl(key)
        assert isinstance(signer, rsa.RSAPrivateKey)
        return signer.sign(message, _PSS, hashes.SHA256())
    return bytes(pss.new(key, rand_func=rng).sign(SHA256.new(message)))


def rsa_verify(key: RsaKey, message: bytes, signature: bytes) -> None:
    loaded = _openssl(key)
    public = loaded.public_key() if isinstance(loaded, rsa.RSAPrivateKey) else loaded
    try:
        public.verify(signature, message, _PSS, hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise AuthenticationError("signature does not verify") from None


class KeyImportError(ValueError):
    """An RSA key that does not import; ``reason`` says why in words for a config error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def import_rsa(data: bytes, passphrase: bytes | None) -> RsaKey:
    """An RSA key from PEM bytes (a private one may be encrypted with ``passphrase``)."""
    try:
        return RSA.import_key(data, passphrase)
    except PassphraseRequiredError:
        raise KeyImportError("private key is encrypted; a passphrase is required") from None
    except IncorrectPassphraseError:
        raise KeyImportError("wrong passphrase (or the key file is corrupted)") from None
    except KdfLimitError:
        raise KeyImportError("key encryption asks for too costly a derivation") from None
    except (ValueError, IndexError, TypeError):
        raise KeyImportError("not an RSA key in PEM format") from None


def generate_rsa(bits: int) -> RsaKey:
    """A new RSA private key with e = 65537."""
    return RSA.generate(bits)


_ZEROS = bytes(256 * 1024)


class PaddingSource:
    """Random bytes from AES-256-CTR under a fresh random key: a fast CSPRNG.

    Cell padding is encrypted anyway; what matters is that it is unpredictable and cheap.
    One source serves every connection of the process (setting up a cipher costs more
    than a short connection's padding); the lock keeps the keystream from being reused.
    """

    def __init__(self, seed: bytes | None = None) -> None:
        key_and_iv = seed if seed is not None else os.urandom(KEY_SIZE + 16)
        cipher = Cipher(algorithms.AES(key_and_iv[:KEY_SIZE]), modes.CTR(key_and_iv[KEY_SIZE:]))
        self._stream = cipher.encryptor()
        self._lock = threading.Lock()

    def fill(self, out: memoryview) -> None:
        """Overwrite ``out`` with random bytes (update_into: no allocation, 6x faster than
        update on 128 KB)."""
        with self._lock, memoryview(_ZEROS) as zeros:
            for start in range(0, len(out), len(zeros)):
                part = out[start : start + len(zeros)]
                self._stream.update_into(zeros[: len(part)], part)
