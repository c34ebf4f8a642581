"""RSA key files: load, check, fingerprint, generate and write.

Every failure is a ``ConfigError`` with one line that names the file. No
message ever contains key material: only paths, sizes and modes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
from pathlib import Path

from utils.crypto import KeyImportError, RsaKey, generate_rsa, import_rsa, x25519_public
from utils.errors import ConfigError
from utils.platform_support import O_BINARY, set_file_mode
from utils.strictmodes import read_trusted_file

__all__ = [
    "MIN_BITS",
    "PROTECTION",
    "RsaKey",
    "fingerprint",
    "fingerprint_bytes",
    "fingerprint_text",
    "generate_pair",
    "load_private_key",
    "load_public_key",
    "load_server_public_key",
    "pair_paths",
    "public_key_file",
    "write_pair",
]

#: Smallest accepted RSA modulus, in bits.
MIN_BITS = 2048

#: PKCS#8 encryption of a private key written with a passphrase (supported by pycryptodome 4.4).
PROTECTION = "PBKDF2WithHMAC-SHA512AndAES256-CBC"

#: A key pair's name becomes part of two file names: keep it a plain file name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Largest key file we read; real RSA PEM files are a few kilobytes.
_MAX_FILE = 1 << 20


def _read_key_file(path: Path, private: bool) -> bytes:
    """A key file that passes StrictModes (a private one: readable by its owner only)."""
    what = "private key" if private else "public key"
    return read_trusted_file(path, what, _MAX_FILE, secret=private)


def _import(path: Path, data: bytes, passphrase: bytes | None) -> RsaKey:
    try:
        return import_rsa(data, passphrase)
    except KeyImportError as exc:
        raise ConfigError(f"{path}: {exc.reason}") from None


def _check_size(path: Path, key: RsaKey) -> RsaKey:
    bits = key.size_in_bits()
    if bits < MIN_BITS:
        raise ConfigError(f"{path}: RSA key has {bits} bits; at least {MIN_BITS} are required")
    return key


def load_private_key(path: Path, passphrase: bytes | None = None) -> RsaKey:
    """Load an RSA private key of at least 2048 bits from a file only its owner can read."""
    data, _ = _split_static_block(path, _read_key_file(path, private=True))
    key = _import(path, data, passphrase)
    if not key.has_private():
        raise ConfigError(f"{path}: holds a public key; expected a private key")
    return _check_size(path, key)


def load_public_key(path: Path) -> RsaKey:
    """Load an RSA public key of at least 2048 bits; a private key here is refused."""
    return _load_public(path)[0]


def load_server_public_key(path: Path) -> tuple[RsaKey, bytes]:
    """A server's public key file: the RSA key and the static X25519 share genkey wrote
    after it (the ClientInit is sealed to that share, docs/PROTOCOL.md section 2)."""
    key, share = _load_public(path)
    if share is None:
        raise ConfigError(
            f"{path}: has no {STATIC_BLOCK} block (a key file from sockproxy 1); on the server "
            f"run: python3 utils/genkey.py --export-public SERVER_PRIVATE_KEY > {path.name}"
        )
    return key, share


def _load_public(path: Path) -> tuple[RsaKey, bytes | None]:
    data, share = _split_static_block(path, _read_key_file(path, private=False))
    try:
        key = _import(path, data, None)
    except ConfigError:
        if b"PRIVATE KEY" in data:  # an encrypted private key fails before we can look at it
            raise ConfigError(
                f"{path}: holds a private key; expected a public key (keep private keys secret)"
            ) from None
        raise
    if key.has_private():
        raise ConfigError(
            f"{path}: holds a private key; expected a public key (keep private keys secret)"
        )
    return _check_size(path, key), share


STATIC_BLOCK = "SOCKPROXY X25519 PUBLIC KEY"
_STATIC_PEM = re.compile(
    rb"-----BEGIN " + STATIC_BLOCK.encode() + rb"-----\s*([A-Za-z0-9+/=\s]*?)\s*"
    rb"-----END " + STATIC_BLOCK.encode() + rb"-----\s*"
)


def _split_static_block(path: Path, data: bytes) -> tuple[bytes, bytes | None]:
    """(the RSA PEM, the 32-byte share or None when the file has no such block)."""
    match = _STATIC_PEM.search(data)
    if match is None:
        return data, None
    try:
        share = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except ValueError:
        share = b""
    if len(share) != 32:
        raise ConfigError(f"{path}: the {STATIC_BLOCK} block is not a 32-byte key")
    return data[: match.start()] + data[match.end() :], share


def public_key_file(key: RsaKey) -> bytes:
    """What genkey writes as NAME_public.pem: the RSA public key, then the static X25519
    share derived from the private key (used when this pair is a server's)."""
    share = base64.b64encode(x25519_public(key))
    block = f"-----BEGIN {STATIC_BLOCK}-----\n".encode() + share
    return (
        key.public_key().export_key(format="PEM")
        + b"\n"
        + block
        + (f"\n-----END {STATIC_BLOCK}-----".encode())
    )


def fingerprint_bytes(key: RsaKey) -> bytes:
    """SHA-256 over the DER SubjectPublicKeyInfo of the public half (32 bytes)."""
    return hashlib.sha256(key.public_key().export_key(format="DER")).digest()


def fingerprint(key: RsaKey) -> str:
    """The OpenSSH-style text form: ``SHA256:`` and unpadded base64 of ``fingerprint_bytes``."""
    return fingerprint_text(fingerprint_bytes(key))


def fingerprint_text(digest: bytes) -> str:
    """``SHA256:`` and unpadded base64 of a raw fingerprint: one format everywhere."""
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def generate_pair(bits: int) -> RsaKey:
    """A new RSA private key (e = 65537) of ``bits`` bits, at least 2048."""
    if bits < MIN_BITS:
        raise ConfigError(f"key size {bits} bits is too small; at least {MIN_BITS} are required")
    try:
        return generate_rsa(bits)
    except ValueError as exc:
        raise ConfigError(f"cannot generate a {bits}-bit RSA key: {exc}") from None


def pair_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """``(NAME_private.pem, NAME_public.pem)`` inside ``directory``; the name must be plain."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"invalid key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)"
        )
    return directory / f"{name}_private.pem", directory / f"{name}_public.pem"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; fail if anything is already there (even a symlink)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, mode)
    try:
        set_file_mode(fd, path, mode)  # the umask may have taken bits away; never adds any
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write a temp file in the same folder with ``mode`` from the start, then rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        set_file_mode(fd, tmp, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise


def write_pair(
    directory: Path, name: str, key: RsaKey, force: bool, passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Write ``NAME_private.pem`` (PKCS#8, mode 0600) and ``NAME_public.pem`` (mode 0644).

    Without ``force`` nothing is overwritten: if either file exists, nothing is
    written. With ``force`` each file is replaced atomically. With a passphrase
    the private key is encrypted (``PROTECTION``). Returns ``(private, public)``.
    """
    private_path, public_path = pair_paths(directory, name)
    if not key.has_private():
        raise ConfigError(f"{private_path}: cannot write a private key from a public key")
    if passphrase is not None and not passphrase:
        raise ConfigError(f"{private_path}: the passphrase is empty")
    if not force:
        for path in (private_path, public_path):
            if path.exists() or path.is_symlink():
                raise ConfigError(f"{path}: already exists; use --force to overwrite")
    protection = PROTECTION if passphrase is not None else None
    private_pem = key.export_key(format="PEM", pkcs=8, passphrase=passphrase, protection=protection)
    public_pem = public_key_file(key)
    write = _replace if force else _write_new
    for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
        try:
            write(path, data + b"\n", mode)
        except FileExistsError:
            _undo(private_path, path, force)
            raise ConfigError(f"{path}: already exists; use --force to overwrite") from None
        except OSError as exc:
            _undo(private_path, path, force)
            raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None
    return private_path, public_path


def _undo(private_path: Path, failed: Path, force: bool) -> None:
    """After the public file failed, do not leave a private key without its pair behind."""
    if not force and failed != private_path:
        private_path.unlink(missing_ok=True)
