"""utils/keys.py and the utils/genkey.py script."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from Crypto.PublicKey import ECC, RSA
from Crypto.Util.asn1 import DerObjectId
from cryptography.hazmat.primitives import serialization

from utils import genkey
from utils.errors import ConfigError
from utils.keys import (
    RsaKey,
    fingerprint,
    fingerprint_bytes,
    generate_pair,
    load_private_key,
    load_public_key,
    pair_paths,
    write_pair,
)

OID_HMAC_SHA512 = "1.2.840.113549.2.11"
OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"


@pytest.fixture(scope="module")
def key() -> RsaKey:
    return generate_pair(2048)


@pytest.fixture(scope="module")
def other_key() -> RsaKey:
    return generate_pair(2048)


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- fingerprints ----------------------------------------------------------------------------


def test_fingerprint_matches_an_independent_implementation(key: RsaKey) -> None:
    pem = key.public_key().export_key(format="PEM")
    der = serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(der).digest()
    assert fingerprint_bytes(key) == digest
    assert fingerprint(key) == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def test_fingerprint_shape_and_public_private_agree(key: RsaKey, other_key: RsaKey) -> None:
    text = fingerprint(key)
    assert text.startswith("SHA256:")
    assert "=" not in text
    assert len(text) == len("SHA256:") + 43  # 32 bytes, unpadded base64
    assert len(fingerprint_bytes(key)) == 32
    assert fingerprint(key.public_key()) == text
    assert fingerprint(other_key) != text


# --- loading ---------------------------------------------------------------------------------


def test_write_then_load_round_trip(tmp_path: Path, key: RsaKey) -> None:
    private_path, public_path = write_pair(tmp_path, "local", key, force=False)
    assert (private_path, public_path) == pair_paths(tmp_path, "local")
    assert private_path.name == "local_private.pem"
    assert public_path.name == "local_public.pem"
    assert b"-----BEGIN PRIVATE KEY-----" in private_path.read_bytes()  # PKCS#8
    assert b"-----BEGIN PUBLIC KEY-----" in public_path.read_bytes()
    assert load_private_key(private_path) == key
    loaded_public = load_public_key(public_path)
    assert not loaded_public.has_private()
    assert loaded_public == key.public_key()


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o601, 0o610, 0o777])
def test_private_key_open_to_group_or_others_is_refused(
    tmp_path: Path, key: RsaKey, bad_mode: int
) -> None:
    private_path, _ = write_pair(tmp_path, "k", key, force=False)
    private_path.chmod(bad_mode)
    with pytest.raises(ConfigError) as info:
        load_private_key(private_path)
    message = str(info.value)
    assert message == (
        f"{private_path}: private key is readable by group/others (mode {bad_mode:04o}); "
        f"run chmod 600 {private_path}"
    )


@pytest.mark.parametrize("good_mode", [0o600, 0o400])
def test_private_key_readable_by_owner_only_is_accepted(
    tmp_path: Path, key: RsaKey, good_mode: int
) -> None:
    private_path, _ = write_pair(tmp_path, "k", key, force=False)
    private_path.chmod(good_mode)
    assert load_private_key(private_path) == key


def test_public_key_may_be_world_readable(tmp_path: Path, key: RsaKey) -> None:
    _, public_path = write_pair(tmp_path, "k", key, force=False)
    public_path.chmod(0o644)
    assert load_public_key(public_path) == key.public_key()


def _private_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "key.pem"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    for load in (load_private_key, load_public_key):
        with pytest.raises(ConfigError, match="no such file") as info:
            load(missing)
        assert str(info.value).startswith(f"{missing}: ")


def test_directory_or_fifo_is_not_a_key(tmp_path: Path) -> None:
    folder = tmp_path / "dir.pem"
    folder.mkdir(mode=0o700)
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo, 0o600)
    for path in (folder, fifo):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_public_key(path)
        with pytest.raises(ConfigError, match="not a regular file"):
            load_private_key(path)


def test_unreadable_file(tmp_path: Path, key: RsaKey, monkeypatch: pytest.MonkeyPatch) -> None:
    _, public_path = write_pair(tmp_path, "k", key, force=False)
    real_open = os.open

    def deny(path: object, *args: int) -> int:  # chmod 000 does not stop root: fake it
        if path == public_path:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ConfigError) as info:
        load_public_key(public_path)
    assert str(info.value) == f"{public_path}: permission denied"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world\n",
        b"-----BEGIN PUBLIC KEY-----\nnot base64 !!\n-----END PUBLIC KEY-----\n",
        b"-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n"
        b"-----END PUBLIC KEY-----\n",
    ],
)
def test_not_an_rsa_key(tmp_path: Path, data: bytes) -> None:
    path = _private_file(tmp_path, data)
    for load in (load_private_key, load_public_key):
        with pytest.raises(ConfigError, match="not an RSA key") as info:
            load(path)
        assert str(info.value).startswith(f"{path}: ")


def test_ec_key_is_not_an_rsa_key(tmp_path: Path) -> None:
    path = _private_file(tmp_path, ECC.generate(curve="p256").export_key(format="PEM").encode())
    with pytest.raises(ConfigError, match="not an RSA key"):
        load_private_key(path)


def test_public_file_holding_a_private_key(tmp_path: Path, key: RsaKey) -> None:
    private_path, _ = write_pair(tmp_path, "k", key, force=False)
    with pytest.raises(ConfigError, match="holds a private key; expected a public key") as info:
        load_public_key(private_path)
    assert str(info.value).startswith(f"{private_path}: ")


def test_public_file_holding_an_encrypted_private_key(tmp_path: Path, key: RsaKey) -> None:
    private_path, _ = write_pair(tmp_path, "k", key, force=False, passphrase=b"secret")
    with pytest.raises(ConfigError, match="holds a private key"):
        load_public_key(private_path)


def test_private_file_holding_a_public_key(tmp_path: Path, key: RsaKey) -> None:
    _, public_path = write_pair(tmp_path, "k", key, force=False)
    public_path.chmod(0o600)
    with pytest.raises(ConfigError, match="holds a public key; expected a private key"):
        load_private_key(public_path)


def test_small_keys_are_refused(tmp_path: Path) -> None:
    small = RSA.generate(1024)
    private_path = _private_file(tmp_path, small.export_key(pkcs=8))
    public_path = tmp_path / "pub.pem"
    public_path.write_bytes(small.public_key().export_key())
    with pytest.raises(ConfigError, match="1024 bits; at least 2048"):
        load_private_key(private_path)
    with pytest.raises(ConfigError, match="1024 bits; at least 2048"):
        load_public_key(public_path)


def test_pkcs1_private_key_is_accepted(tmp_path: Path, key: RsaKey) -> None:
    path = _private_file(tmp_path, key.export_key(pkcs=1))
    assert load_private_key(path) == key


# --- passphrases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory, key: RsaKey) -> Path:
    folder = tmp_path_factory.mktemp("encrypted")
    private_path, _ = write_pair(folder, "k", key, force=False, passphrase="pässword".encode())
    return private_path


def test_encrypted_private_key_uses_pbkdf2_sha512_aes256(encrypted: Path) -> None:
    text = encrypted.read_text()
    assert "-----BEGIN ENCRYPTED PRIVATE KEY-----" in text
    der = base64.b64decode("".join(text.strip().splitlines()[1:-1]))
    assert DerObjectId(OID_HMAC_SHA512).encode() in der
    assert DerObjectId(OID_AES256_CBC).encode() in der


def test_right_passphrase(encrypted: Path, key: RsaKey) -> None:
    assert load_private_key(encrypted, "pässword".encode()) == key


def test_wrong_passphrase(encrypted: Path) -> None:
    with pytest.raises(ConfigError, match="wrong passphrase") as info:
        load_private_key(encrypted, b"guess")
    assert str(info.value).startswith(f"{encrypted}: ")


def test_missing_passphrase(encrypted: Path) -> None:
    with pytest.raises(ConfigError, match="passphrase is required"):
        load_private_key(encrypted)


def test_empty_passphrase_is_refused(tmp_path: Path, key: RsaKey) -> None:
    with pytest.raises(ConfigError, match="passphrase is empty"):
        write_pair(tmp_path, "k", key, force=False, passphrase=b"")
    assert list(tmp_path.iterdir()) == []


# --- writing ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_written_modes_do_not_depend_on_the_umask(tmp_path: Path, key: RsaKey, mask: int) -> None:
    os.umask(mask)
    private_path, public_path = write_pair(tmp_path, "k", key, force=False)
    assert mode(private_path) == 0o600
    assert mode(public_path) == 0o644
    private_path, public_path = write_pair(tmp_path, "k", key, force=True)
    assert mode(private_path) == 0o600
    assert mode(public_path) == 0o644


@pytest.mark.parametrize("existing", ["k_private.pem", "k_public.pem"])
def test_no_overwrite_without_force(
    tmp_path: Path, key: RsaKey, other_key: RsaKey, existing: str
) -> None:
    (tmp_path / existing).write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="already exists") as info:
        write_pair(tmp_path, "k", key, force=False)
    assert str(info.value).startswith(str(tmp_path / existing))
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # nothing else written
    assert (tmp_path / existing).read_bytes() == b"keep me"


def test_dangling_symlink_is_not_followed(tmp_path: Path, key: RsaKey) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "k_private.pem").symlink_to(target)
    with pytest.raises(ConfigError, match="already exists"):
        write_pair(tmp_path, "k", key, force=False)
    assert not target.exists()


def test_force_replaces_atomically(tmp_path: Path, key: RsaKey, other_key: RsaKey) -> None:
    write_pair(tmp_path, "k", key, force=False)
    private_path, public_path = write_pair(tmp_path, "k", other_key, force=True)
    assert load_private_key(private_path) == other_key
    assert load_public_key(public_path) == other_key.public_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k_private.pem", "k_public.pem"]


def test_write_pair_needs_a_private_key(tmp_path: Path, key: RsaKey) -> None:
    with pytest.raises(ConfigError, match="from a public key"):
        write_pair(tmp_path, "k", key.public_key(), force=False)


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "-x", "x" * 65, "a b"])
def test_bad_pair_names(tmp_path: Path, key: RsaKey, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid key name"):
        write_pair(tmp_path, name, key, force=False)
    assert list(tmp_path.iterdir()) == []


def test_generate_pair() -> None:
    with pytest.raises(ConfigError, match="at least 2048"):
        generate_pair(1024)


def test_key_material_never_in_messages(tmp_path: Path, key: RsaKey) -> None:
    private_path, _ = write_pair(tmp_path, "k", key, force=False)
    private_path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_private_key(private_path)
    message = str(info.value)
    assert str(key.d)[:20] not in message
    assert "PRIVATE KEY-----" not in message


# --- genkey.py -------------------------------------------------------------------------------

PAIR_FILES = ["local_private.pem", "local_public.pem", "server_private.pem", "server_public.pem"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real run of genkey (two 2048-bit pairs) into a fresh, not yet existing folder."""
    folder = tmp_path_factory.mktemp("genkey") / "keys"
    out = io.StringIO()  # capsys is per test; this fixture is per module
    with contextlib.redirect_stdout(out):
        code = genkey.main(["--dir", str(folder), "--bits", "2048"])
    assert code == 0
    return folder, out.getvalue()


def test_genkey_writes_four_files_with_safe_modes(generated: tuple[Path, str]) -> None:
    folder, _ = generated
    assert sorted(p.name for p in folder.iterdir()) == PAIR_FILES
    assert mode(folder) == 0o700
    for name in PAIR_FILES:
        expected = 0o600 if "private" in name else 0o644
        assert mode(folder / name) == expected, name


def test_genkey_writes_two_independent_pairs(generated: tuple[Path, str]) -> None:
    folder, _ = generated
    local = load_private_key(folder / "local_private.pem")
    server = load_private_key(folder / "server_private.pem")
    assert local != server
    assert fingerprint(local) != fingerprint(server)
    assert load_public_key(folder / "local_public.pem") == local.public_key()
    assert load_public_key(folder / "server_public.pem") == server.public_key()
    assert local.size_in_bits() == server.size_in_bits() == 2048


def test_genkey_prints_paths_and_fingerprints(generated: tuple[Path, str]) -> None:
    folder, output = generated
    for side in ("local", "server"):
        public_path = folder / f"{side}_public.pem"
        expected = fingerprint(load_public_key(public_path))
        assert any(str(public_path) in line and expected in line for line in output.splitlines())
    assert "BEGIN" not in output


def test_genkey_refuses_overwrite_without_force(
    tmp_path: Path, generated: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = generated
    before = {name: (folder / name).read_bytes() for name in PAIR_FILES}
    assert genkey.main(["--dir", str(folder), "--bits", "2048"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "already exists" in err
    assert "--force" in err
    assert {name: (folder / name).read_bytes() for name in PAIR_FILES} == before


def test_genkey_force_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert genkey.main(["--dir", str(tmp_path), "--bits", "2048", "--name", "a"]) == 0
    before = load_private_key(tmp_path / "a_private.pem")
    assert genkey.main(["--dir", str(tmp_path), "--bits", "2048", "--name", "a"]) == 2
    assert genkey.main(["--dir", str(tmp_path), "--bits", "2048", "--name", "a", "--force"]) == 0
    after = load_private_key(tmp_path / "a_private.pem")
    assert after != before
    assert mode(tmp_path / "a_private.pem") == 0o600


def test_genkey_name_writes_one_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "out"
    assert genkey.main(["--dir", str(folder), "--bits", "2048", "--name", "relay2"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["relay2_private.pem", "relay2_public.pem"]
    public = load_public_key(folder / "relay2_public.pem")
    assert fingerprint(public) in capsys.readouterr().out


def test_genkey_rejects_small_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert genkey.main(["--dir", str(tmp_path / "k"), "--bits", "1024"]) == 2
    assert "2048" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_genkey_rejects_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert genkey.main(["--dir", str(tmp_path), "--name", "../up"]) == 2
    assert "invalid key name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_genkey_passphrase_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GENKEY_TEST_PASS", "open sesame")
    argv = ["--dir", str(tmp_path), "--bits", "2048", "--name", "p"]
    assert genkey.main([*argv, "--passphrase-env", "GENKEY_TEST_PASS"]) == 0
    assert "open sesame" not in capsys.readouterr().out
    private_path = tmp_path / "p_private.pem"
    assert b"ENCRYPTED PRIVATE KEY" in private_path.read_bytes()
    assert load_private_key(private_path, b"open sesame").has_private()
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_private_key(private_path, b"open says me")


def test_genkey_passphrase_variable_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GENKEY_TEST_UNSET", raising=False)
    argv = ["--dir", str(tmp_path), "--name", "p", "--passphrase-env", "GENKEY_TEST_UNSET"]
    assert genkey.main(argv) == 2
    assert "GENKEY_TEST_UNSET" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
