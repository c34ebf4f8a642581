"""scripts/start.py end to end, and a Windows-like smoke test (issue 10).

The smoke test runs start.py in a copy of the programs with a sitecustomize.py that deletes
what Windows' CPython lacks (os.O_NONBLOCK, os.fchmod, os.geteuid, signal.SIGHUP, SIGUSR1 and
SIGUSR2), so the real genkey.py, server.py and local.py start without them; a page is fetched
through them and SIGINT stops everything with exit code 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Keys, _start_http, _stop_http, free_port, run_curl, wait_for

WINDOWS_LACKS = """\
import os, signal
for name in ("O_NONBLOCK", "fchmod", "geteuid"):
    if hasattr(os, name):
        delattr(os, name)
for name in ("SIGHUP", "SIGUSR1", "SIGUSR2"):
    if hasattr(signal, name):
        delattr(signal, name)
"""
BANNER = "try: curl --socks5-hostname"


def _copy_programs(target: Path) -> dict[str, int]:
    """The programs and shipped configs, on free ports; returns the ports."""
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("utils", "server", "client"):
        shutil.copytree(REPO / folder, target / folder, ignore=ignore)
    (target / "scripts").mkdir()
    for name in ("scripts/start.py", "scripts/launcher.py", "server.py", "local.py"):
        shutil.copyfile(REPO / name, target / name)
    ports = {"server_port": free_port(), "local_port": free_port()}
    for name, field in (("server_config.json", "server_port"), ("local_config.json", "local_port")):
        config = json.loads((REPO / name).read_text())
        config[field] = ports[field]
        if name == "local_config.json":
            config["server_port"] = ports["server_port"]
        (target / name).write_text(json.dumps(config))
    return ports


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("www")
    (folder / "page").write_bytes(b"through the proxy\n")
    files = _start_http(folder, "127.0.0.1")
    yield f"http://127.0.0.1:{files.port}/page"
    _stop_http(files)


def _start(root: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "scripts/start.py", "--no-venv"],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def test_start_py_without_posix_only_features(tmp_path: Path, page_url: str) -> None:
    root = tmp_path / "repo"
    ports = _copy_programs(root)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WINDOWS_LACKS)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(site)
    probe = "import os, signal; print(hasattr(os, 'fchmod'), hasattr(signal, 'SIGHUP'))"
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, check=True)
    assert seen.stdout == b"False False\n"  # the deletions reach every child

    log = tmp_path / "start.log"
    process = _start(root, env, log)
    try:
        assert wait_for(lambda: BANNER in log.read_text(), 90, 0.1), log.read_text()
        done = run_curl("--socks5-hostname", f"127.0.0.1:{ports['local_port']}", page_url)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"through the proxy\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert text.count("SIGINT: shutting down") == 2, text  # server and local, each exit 0
    assert "Traceback" not in text
    assert "WARNING" not in text  # the readiness probe binds, it does not connect
    assert "permissions not checked: this platform uses ACLs" in text  # no geteuid: no modes
    for name in ("local", "server"):  # genkey ran without fchmod: modes set by chmod
        assert (root / "keys" / f"{name}_private.pem").stat().st_mode & 0o777 == 0o600


def test_start_py_stops_the_server_when_the_local_dies(tmp_path: Path, keys: Keys) -> None:
    root = tmp_path / "repo"
    _copy_programs(root)
    shutil.copytree(keys.dir, root / "keys")  # no key generation: this test is about the exit
    config = json.loads((root / "local_config.json").read_text())
    config["server_public_key"] = "keys/missing.pem"  # local.py exits 2 at once
    (root / "local_config.json").write_text(json.dumps(config))
    log = tmp_path / "start.log"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    process = _start(root, env, log)
    try:
        assert process.wait(90) == 1, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "keys/missing.pem: no such file" in text
    assert "start.py: local exited with 2" in text
    assert BANNER not in text
    # The server was stopped, not left running (it may still have been loading its modules).
    assert "SIGINT: shutting down" in text or "server.py: stopped before it started" in text
    assert "Traceback" not in text


def test_start_py_refuses_a_port_in_use(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    ports = _copy_programs(root)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["local_port"]))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "scripts/start.py", "--no-venv"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr == (
        f"start.py: local port {ports['local_port']} is in use (sockproxy already running?)\n"
    )
    assert not (root / "keys").exists()  # refused before any work


@pytest.mark.parametrize("version", ["2.7", "3.9"])
def test_start_py_refuses_an_old_python_in_one_line(version: str) -> None:
    found = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))
    if not found:
        pytest.skip(f"no Python {version} in ~/.pyenv to try")
    done = subprocess.run(
        [str(found[-1]), str(REPO / "scripts" / "start.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"sockproxy needs Python 3.10 or newer, this is Python {version}.")
    assert "python.org" in lines[0]


class _FakeProcess:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def poll(self) -> int | None:
        return None

    def send_signal(self, signum: int) -> None:
        self.sent.append(signum)

    def wait(self, timeout: float | None = None) -> int:
        return 0


@pytest.mark.parametrize(("ctrl_break", "expected"), [(None, signal.SIGINT), (1, 1)])
def test_stop_sends_sigint_or_ctrl_break(
    monkeypatch: pytest.MonkeyPatch, ctrl_break: int | None, expected: int
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import launcher  # noqa: PLC0415  (scripts/ is not a package)

    monkeypatch.setattr(launcher, "_CTRL_BREAK", ctrl_break)
    process = _FakeProcess()
    assert launcher.stop(process) == 0  # type: ignore[arg-type]
    assert process.sent == [expected]
