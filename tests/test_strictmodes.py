"""StrictModes: key and config files that others could change are refused (issue 12, item 4).

The table runs the real server.py / local.py: exit code 2 and exactly one line that names the
file and the fix. Tests run as root, so "another user" is made with os.chown to nobody.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Keys, Launcher, _start_http, _stop_http, run_curl, wait_for
from utils import strictmodes
from utils.errors import ConfigError
from utils.keys import load_public_key

NOBODY = 65534


@pytest.fixture(scope="module")
def http_small_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """http://127.0.0.1:PORT/small serving the 5 bytes ``small``."""
    folder = tmp_path_factory.mktemp("www")
    (folder / "small").write_bytes(b"small")
    files = _start_http(folder, "127.0.0.1")
    yield f"http://127.0.0.1:{files.port}/small"
    _stop_http(files)


def _run(script: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, script, "--config", str(config)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _copy(keys: Keys, name: str, folder: Path, mode: int) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.pem"
    shutil.copyfile(keys.path(name), path)
    path.chmod(mode)
    return path


def _world_writable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    return folder


Case = Callable[[Launcher, Keys, Path], tuple[str, Path, str]]


def _authorized_key_0666(launcher: Launcher, keys: Keys, tmp: Path) -> tuple[str, Path, str]:
    key = _copy(keys, "local_public", tmp / "k", 0o666)
    config = launcher.write_config("server", launcher.server_config(local_public_key=str(key)))
    return (
        "server.py",
        config,
        f'server.py: config error: {config}: field "local_public_key": {key}: public key is '
        f"writable by group/others (mode 0666); run chmod go-w {key}",
    )


def _private_key_0620(launcher: Launcher, keys: Keys, tmp: Path) -> tuple[str, Path, str]:
    key = _copy(keys, "local_private", tmp / "k", 0o620)
    config = launcher.write_config("local", launcher.local_config(9, local_private_key=str(key)))
    return (
        "local.py",
        config,
        f'local.py: config error: {config}: field "local_private_key": {key}: private key is '
        f"writable by group/others (mode 0620); run chmod go-w {key}",
    )


def _key_in_open_folder(launcher: Launcher, keys: Keys, tmp: Path) -> tuple[str, Path, str]:
    folder = _world_writable_folder(tmp)
    key = _copy(keys, "server_private", folder, 0o600)
    config = launcher.write_config("server", launcher.server_config(server_private_key=str(key)))
    return (
        "server.py",
        config,
        f'server.py: config error: {config}: field "server_private_key": {key}: private key is '
        f"in a folder writable by others ({folder}, mode 0777); run chmod o-w {folder}",
    )


def _config_group_writable(launcher: Launcher, keys: Keys, tmp: Path) -> tuple[str, Path, str]:
    config = launcher.write_config("server", launcher.server_config())
    config.chmod(0o664)
    return (
        "server.py",
        config,
        f"server.py: config error: {config}: config file is writable by group/others "
        f"(mode 0664); run chmod go-w {config}",
    )


def _config_in_open_folder(launcher: Launcher, keys: Keys, tmp: Path) -> tuple[str, Path, str]:
    folder = _world_writable_folder(tmp)
    config = folder / "local.json"
    shutil.copyfile(launcher.write_config("local", launcher.local_config(9)), config)
    return (
        "local.py",
        config,
        f"local.py: config error: {config}: config file is in a folder writable by others "
        f"({folder}, mode 0777); run chmod o-w {folder}",
    )


def _key_of_another_user(launcher: Launcher, keys: Keys, tmp: Path) -> tuple[str, Path, str]:
    key = _copy(keys, "server_public", tmp / "k", 0o644)
    os.chown(key, NOBODY, NOBODY)
    config = launcher.write_config("local", launcher.local_config(9, server_public_key=str(key)))
    uid = os.geteuid()
    return (
        "local.py",
        config,
        f'local.py: config error: {config}: field "server_public_key": {key}: public key is '
        f"owned by another user (uid {NOBODY}); run chown {uid} {key}",
    )


def _config_of_another_user(launcher: Launcher, keys: Keys, tmp: Path) -> tuple[str, Path, str]:
    config = launcher.write_config("server", launcher.server_config())
    os.chown(config, NOBODY, NOBODY)
    return (
        "server.py",
        config,
        f"server.py: config error: {config}: config file is owned by another user "
        f"(uid {NOBODY}); run chown {os.geteuid()} {config}",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize(
    "case",
    [
        _authorized_key_0666,
        _private_key_0620,
        _key_in_open_folder,
        _config_group_writable,
        _config_in_open_folder,
        _key_of_another_user,
        _config_of_another_user,
    ],
    ids=lambda case: case.__name__.strip("_"),
)
def test_refused_with_one_line_and_exit_2(
    launcher: Launcher, keys: Keys, tmp_path: Path, case: Case
) -> None:
    script, config, expected = case(launcher, keys, tmp_path)
    done = _run(script, config)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [expected]


def test_key_in_a_sticky_world_writable_folder_is_fine(
    launcher: Launcher, keys: Keys, tmp_path: Path
) -> None:
    folder = tmp_path / "sticky"
    folder.mkdir()
    folder.chmod(0o1777)  # like /tmp: others cannot rename or delete our file
    key = _copy(keys, "local_public", folder, 0o644)
    server = launcher.server(local_public_key=str(key))
    server.assert_stops_cleanly()


def test_refused_reload_keeps_the_old_keys(
    launcher: Launcher, keys: Keys, tmp_path: Path, http_small_url: str
) -> None:
    key = _copy(keys, "local_public", tmp_path / "k", 0o644)
    server, local = launcher.pair(server={"local_public_key": str(key)})
    key.chmod(0o666)  # anyone could now swap in their key: the reload must not trust it
    server.proc.send_signal(signal.SIGHUP)
    expected = (
        f'SIGHUP: keeping the old keys: {server.config}: field "local_public_key": {key}: '
        f"public key is writable by group/others (mode 0666); run chmod go-w {key}"
    )
    assert wait_for(lambda: expected in server.stderr(), 10), server.stderr()
    done = run_curl("--socks5-hostname", f"127.0.0.1:{local.port}", http_small_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"small"


def test_no_mode_checks_without_posix_permissions(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Windows (no os.geteuid): ACLs decide, so mode bits are not read; a note says so once."""
    key = _copy(keys, "local_public", tmp_path, 0o666)
    with pytest.raises(ConfigError):
        load_public_key(key)
    monkeypatch.delattr(os, "geteuid")
    strictmodes._note_unchecked.cache_clear()
    caplog.set_level(logging.INFO, "sockproxy")
    load_public_key(key)
    load_public_key(key)
    assert caplog.messages == [
        f"{key}: public key permissions not checked: this platform uses ACLs, not mode bits; "
        "make sure only you can change it"
    ]


def test_symlink_is_judged_by_the_folder_it_points_into(keys: Keys, tmp_path: Path) -> None:
    folder = _world_writable_folder(tmp_path)
    target = _copy(keys, "local_public", folder, 0o644)
    link = tmp_path / "safe" / "key.pem"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(ConfigError) as info:
        load_public_key(link)
    assert str(info.value) == (
        f"{link}: public key is in a folder writable by others ({folder}, mode 0777); "
        f"run chmod o-w {folder}"
    )


def test_size_limit_and_fifo(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 101)
    with pytest.raises(ConfigError) as info:
        strictmodes.read_trusted_file(big, "config file", 100)
    assert str(info.value) == f"{big}: too large for a config file (at most 100 bytes)"
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError) as info:
        strictmodes.read_trusted_file(fifo, "config file", 100)  # O_NONBLOCK: no hang
    assert str(info.value) == f"{fifo}: not a regular file"
