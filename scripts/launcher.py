"""What ``python3 scripts/start.py`` does, on Linux, macOS and Windows alike.

1. make ``.venv`` (unless ``--no-venv``: then the running interpreter is used) and install
   requirements.txt into it;
2. generate ``keys/`` with utils/genkey.py if a private key of the shipped configs is missing;
3. start server.py and local.py with server_config.json and local_config.json;
4. once both accept connections, print what to try; on Ctrl-C stop both and exit 0; if one
   of them stops by itself, stop the other and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
SERVER_CONFIG = "server_config.json"
LOCAL_CONFIG = "local_config.json"
LISTEN_WAIT = 60.0  # seconds both programs get to start listening
STOP_WAIT = 10.0  # seconds each gets to exit after SIGINT before it is killed


class Stop(Exception):
    """Ctrl-C, SIGTERM or Ctrl-Break reached the launcher."""


def venv_python(venv: Path) -> Path | None:
    """The interpreter of ``venv`` (``bin/python`` on POSIX, ``Scripts/python.exe`` on Windows)."""
    for candidate in (venv / "bin" / "python", venv / "Scripts" / "python.exe"):
        if candidate.exists():
            return candidate
    return None


def prepare_python(use_venv: bool) -> str:
    """The interpreter to run the programs with, with requirements.txt installed."""
    if not use_venv:
        return sys.executable
    venv = ROOT / ".venv"
    python = venv_python(venv)
    if python is None:
        print(f"creating {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv_python(venv)
        if python is None:
            raise SystemExit(f"start.py: {venv} has no python after python -m venv")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements.txt")], check=True)
    return str(python)


def config_value(name: str, field: str) -> object:
    return json.loads((ROOT / name).read_text(encoding="utf-8-sig"))[field]


def endpoint(name: str, address_field: str, port_field: str) -> tuple[str, int]:
    return str(config_value(name, address_field)), int(str(config_value(name, port_field)))


def tighten_config_modes() -> None:
    """Take group/other write from the shipped configs (a clone under umask 002 has it):
    the programs refuse a config that others could change (StrictModes)."""
    if not hasattr(os, "geteuid"):  # Windows: ACLs, not mode bits
        return
    for name in (SERVER_CONFIG, LOCAL_CONFIG):
        path = ROOT / name
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o022:
            path.chmod(mode & ~0o022)
            print(f"start.py: chmod go-w {name} (it was mode {mode:04o})", file=sys.stderr)


def make_missing_keys(python: str) -> None:
    """Run utils/genkey.py when a private key named by the shipped configs is missing."""
    keys = [
        ROOT / str(config_value(SERVER_CONFIG, "server_private_key")),
        ROOT / str(config_value(LOCAL_CONFIG, "local_private_key")),
    ]
    if all(path.exists() for path in keys):
        return
    folder = keys[0].parent
    subprocess.run([python, str(ROOT / "utils" / "genkey.py"), "--dir", str(folder)], check=True)


#: Windows: each program in its own process group, so that stop() can send it Ctrl-Break
#: (CTRL_BREAK_EVENT reaches a whole group; the programs stop on SIGBREAK with exit 0).
_NEW_GROUP: int = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
_CTRL_BREAK: int | None = getattr(signal, "CTRL_BREAK_EVENT", None)


def start(python: str, program: str, config: str) -> subprocess.Popen[bytes]:
    command = [python, str(ROOT / program), "--config", str(ROOT / config)]
    return subprocess.Popen(command, cwd=ROOT, creationflags=_NEW_GROUP)


def port_in_use(address: str, port: int) -> bool:
    """Whether something is bound to ``address:port``: probed by binding, not connecting, so
    the programs log no half-open connection. SO_REUSEADDR lets the probe past TIME_WAIT
    leftovers (POSIX) but never past a listener; Windows, where it would, does without."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return True
    return False


def wait_listening(
    programs: dict[str, subprocess.Popen[bytes]], ports: dict[str, tuple[str, int]]
) -> bool:
    """True once every program holds its port; False if one exits or time runs out."""
    deadline = time.monotonic() + LISTEN_WAIT
    waiting = dict(ports)
    while waiting and time.monotonic() < deadline:
        if any(process.poll() is not None for process in programs.values()):
            return False
        for name, (address, port) in list(waiting.items()):
            if port_in_use(address, port):
                del waiting[name]
        if waiting:
            time.sleep(0.2)
    return not waiting


def stop(process: subprocess.Popen[bytes], endpoint: tuple[str, int] | None = None) -> int:
    """SIGINT, or Ctrl-Break on Windows (the programs exit 0 on either); then wait.

    A program still loading its modules cannot handle the signal yet (a stop during its
    imports would end in a traceback): wait until it listens on ``endpoint`` (or exits),
    for STOP_WAIT at most, first."""
    deadline = time.monotonic() + STOP_WAIT
    while (
        endpoint is not None
        and process.poll() is None
        and not port_in_use(*endpoint)
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    if process.poll() is None:
        process.send_signal(signal.SIGINT if _CTRL_BREAK is None else _CTRL_BREAK)
    try:
        return process.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise Stop


def supervise(
    programs: dict[str, subprocess.Popen[bytes]], ports: dict[str, tuple[str, int]]
) -> int:
    if not wait_listening(programs, ports):
        for name, process in programs.items():
            if process.poll() is not None:
                print(f"start.py: {name} exited with {process.returncode}", file=sys.stderr)
        print("start.py: a program did not start (see its message above)", file=sys.stderr)
        return 1
    address, port = ports["local"]
    proxy = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    print(
        f"SOCKS5 and HTTP CONNECT proxy on {proxy} - try: "
        f"curl --socks5-hostname {proxy} http://example.com/   (Ctrl-C stops both)",
        file=sys.stderr,
        flush=True,
    )
    while True:
        for name, process in programs.items():
            if process.poll() is not None:
                print(f"start.py: {name} exited with {process.returncode}", file=sys.stderr)
                return 1
        time.sleep(0.5)


def run(use_venv: bool) -> int:
    ports = {
        "server": endpoint(SERVER_CONFIG, "server_address", "server_port"),
        "local": endpoint(LOCAL_CONFIG, "local_address", "local_port"),
    }
    for name, (address, port) in ports.items():
        if port_in_use(address, port):
            print(
                f"start.py: {name} port {port} is in use (sockproxy already running?)",
                file=sys.stderr,
            )
            return 1
    python = prepare_python(use_venv)
    tighten_config_modes()
    make_missing_keys(python)
    programs: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    try:
        programs["server"] = start(python, "server.py", SERVER_CONFIG)
        programs["local"] = start(python, "local.py", LOCAL_CONFIG)
        code = supervise(programs, ports)
    except (Stop, KeyboardInterrupt):
        code = 0
    finally:
        for name, process in programs.items():
            if stop(process, ports[name]) not in (0, None) and code == 0:
                code = 1
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="start.py",
        description="Install into .venv, make missing keys, start server.py and local.py with "
        "the shipped configs; Ctrl-C stops both.",
    )
    parser.add_argument(
        "--no-venv", action="store_true", help="use this interpreter as it is (no .venv, no pip)"
    )
    args = parser.parse_args(argv)
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, _raise_stop)
    try:
        return run(use_venv=not args.no_venv)
    except (Stop, KeyboardInterrupt):  # before the programs started: nothing to stop
        print("start.py: stopped", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"start.py: {' '.join(map(str, exc.cmd))} failed ({exc.returncode})", file=sys.stderr)
        return 1
