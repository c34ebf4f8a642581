"""Loopback integration: setting up without scripts/start.sh (issue 9 items 4-6).

``--check`` on good and bad configs, the missing-dependency line from a bare venv, the
``cannot listen`` line. (Access-log events: tests/test_integration_clients.py.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from Crypto.PublicKey import RSA

from tests.conftest import REPO, Keys, Launcher
from utils.keys import fingerprint, load_public_key

TIMEOUT = 30


def _run(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, *args], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _run_together(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run the programs at the same time (each start imports the crypto libraries)."""
    procs = [
        subprocess.Popen(
            [sys.executable, *command],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def _fingerprint(keys: Keys, name: str) -> str:
    return fingerprint(load_public_key(Path(keys.path(name))))


# --------------------------------------------------------------------------- --check


def test_check_good_configs(launcher: Launcher, keys: Keys) -> None:
    server_config = launcher.server_config()
    server_path = launcher.write_config("server", server_config)
    local_config = launcher.local_config(server_config["server_port"])
    local_path = launcher.write_config("local", local_config)

    server, local = _run_together(
        [
            ["server.py", "--check", "--config", str(server_path)],
            ["local.py", "--check", "--config", str(local_path)],
        ]
    )
    assert (server.returncode, server.stderr) == (0, "")
    assert server.stdout == (
        f"{server_path}: OK: listens on 127.0.0.1:{server_config['server_port']}; "
        f"server key {_fingerprint(keys, 'server_public')}; "
        f"1 authorized key(s): local_public {_fingerprint(keys, 'local_public')}\n"
    )
    assert (local.returncode, local.stderr) == (0, "")
    assert local.stdout == (
        f"{local_path}: OK: listens on 127.0.0.1:{local_config['local_port']} (auth off); "
        f"local key {_fingerprint(keys, 'local_public')}; "
        f"1 server(s): 127.0.0.1:{server_config['server_port']} "
        f"{_fingerprint(keys, 'server_public')}\n"
    )


@pytest.fixture(scope="module")
def small_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small_public.pem"
    path.write_bytes(RSA.generate(1024).public_key().export_key())
    return path


BAD = {
    "1024 bits": "RSA key has 1024 bits; at least 2048 are required",
    "private key": "holds a private key; expected a public key",
    "not a key": "not an RSA key in PEM format",
    "broken json": "",
}
BAD_CASES = [
    ("server.py", "1024 bits"),
    ("server.py", "not a key"),
    ("local.py", "1024 bits"),
    ("local.py", "private key"),
    ("local.py", "broken json"),
]


def _bad_config(
    launcher: Launcher, keys: Keys, small_key: Path, program: str, problem: str
) -> Path:
    field = "local_public_key" if program == "server.py" else "server_public_key"
    value = {
        "1024 bits": str(small_key),
        "private key": keys.path("other_private"),
        "not a key": str(REPO / "README.md"),
        "broken json": "",
    }[problem]
    if program == "server.py":
        config = launcher.server_config(**{field: value})
    else:
        config = launcher.local_config(1, **{field: value})
    path = launcher.write_config(program, config)
    if problem == "broken json":
        path.write_text(json.dumps(config)[:-2])
    return path


def test_check_bad_configs(launcher: Launcher, keys: Keys, small_key: Path) -> None:
    paths = [_bad_config(launcher, keys, small_key, *case) for case in BAD_CASES]
    runs = _run_together(
        [
            [program, "--check", "--config", str(path)]
            for (program, _), path in zip(BAD_CASES, paths, strict=True)
        ]
    )
    for (program, problem), path, done in zip(BAD_CASES, paths, runs, strict=True):
        assert (done.returncode, done.stdout) == (2, ""), (program, problem, done.stderr)
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"{program}: config error: {path}")
        assert BAD[problem] in line
        if problem != "broken json":
            field = "local_public_key" if program == "server.py" else "server_public_key"
            assert f'field "{field}"' in line


# --------------------------------------------------------------------------- missing packages


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A venv with none of the requirements (and no pip): what a fresh machine has."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


@pytest.mark.parametrize("program", ["server.py", "local.py", "utils/genkey.py"])
def test_missing_requirements_one_line(bare_python: str, program: str) -> None:
    done = _run(program, "--help", python=bare_python)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    name = Path(program).name
    assert line.startswith(f"{name}: the Python package ")
    assert any(f"package {package} is not installed" in line for package in ("numpy",
               "pycryptodome", "cryptography"))  # fmt: skip
    assert f"{bare_python} -m pip install -r {REPO / 'requirements.txt'}" in line
    assert "Traceback" not in done.stderr


def test_test_client_needs_no_requirements(bare_python: str) -> None:
    done = _run("utils/test_client.py", "--help", python=bare_python)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


# --------------------------------------------------------------------------- listening, log


def test_cannot_listen_names_address_and_port(launcher: Launcher) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        program = launcher.start(
            "local.py", launcher.local_config(1, local_port=port), "local_port"
        )
        assert program.proc.wait(TIMEOUT) == 1
    program.returncode = 0  # it never ran: nothing for stop_all to stop
    assert program.stderr().splitlines()[-1] == (
        f"local.py: cannot listen on 127.0.0.1:{port}: address already in use"
    )
