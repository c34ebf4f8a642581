"""Processes for the benchmarks: start, wait until listening, stop by PID (with descendants).

Shared by bench/run.py (socksbench on loopback) and bench/wan.py (the delay relay). Every
process started through ``Processes`` is stopped by its own PID, never by name.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
APT_PACKAGES = ("openssh-server", "openssh-client", "shadowsocks-libev", "microsocks")


class PeerError(Exception):
    """A peer could not be started or measured."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def interrupt_on(*signums: int) -> None:
    """These signals end a benchmark as Ctrl-C does (KeyboardInterrupt), so that its
    ``finally`` stops every process it started."""
    for signum in signums:
        signal.signal(signum, _interrupt)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def remove_tmp(tmp: Path, keep: bool) -> None:
    """The run's temporary folder: kept (and named in the log) with --keep-tmp, else removed."""
    if keep:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ processes


def _ppid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` right now."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and _ppid(int(n)) == pid]


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        if child not in found:
            found.append(child)
            todo.extend(children_of(child))
    return found


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass
class Proc:
    """A process started by this run; its output goes to ``log_path`` (or a pipe)."""

    name: str
    popen: subprocess.Popen[bytes]
    command: list[str]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclass
class Stopped:
    exit_code: int | None
    forced: bool  # SIGKILL was needed


class Processes:
    """Every process this run started; ``stop_all`` ends the ones left, with descendants."""

    def __init__(self) -> None:
        self._live: list[Proc] = []

    def start(
        self,
        name: str,
        command: list[str],
        log_path: Path | None,
        *,
        cwd: Path | None = None,
        pipe_stdout: bool = False,
    ) -> Proc:
        log(f"start {name}: {shlex.join(command)}")
        out: int | IO[bytes]
        if pipe_stdout:
            out, err = subprocess.PIPE, None  # stderr (progress) goes to ours
        elif log_path is not None:
            out = log_path.open("ab")
            err = subprocess.STDOUT
        else:
            out, err = subprocess.DEVNULL, subprocess.DEVNULL
        try:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches us, and we stop them in order
            )
        finally:
            if not isinstance(out, int):
                out.close()
        proc = Proc(name, popen, command, log_path)
        self._live.append(proc)
        return proc

    def forget(self, proc: Proc) -> None:
        if proc in self._live:
            self._live.remove(proc)

    def stop(self, proc: Proc, timeout: float = STOP_TIMEOUT) -> Stopped:
        """SIGTERM and wait; SIGKILL after ``timeout``. Leftover descendants are ended too."""
        tree = descendants(proc.pid) if proc.popen.poll() is None else []
        forced = False
        if proc.popen.poll() is None:
            _signal_pid(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            forced = True
            _signal_pid(proc.pid, signal.SIGKILL)
            proc.popen.wait()
        for pid in tree:
            if Path(f"/proc/{pid}").exists():
                _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while any(Path(f"/proc/{pid}").exists() for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in tree:
            if Path(f"/proc/{pid}").exists():
                _signal_pid(pid, signal.SIGKILL)
        self.forget(proc)
        return Stopped(proc.popen.returncode, forced)

    def stop_all(self) -> None:
        for proc in reversed(list(self._live)):
            log(f"stopping leftover {proc.name} (pid {proc.pid})")
            self.stop(proc, timeout=5)


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (all held open until every one is chosen)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def listening_ports() -> set[int] | None:
    """Ports in LISTEN state (from /proc/net/tcp*), or None where /proc cannot tell."""
    ports: set[int] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    except (OSError, IndexError, ValueError):
        return None
    return ports


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, procs: Iterable[Proc], timeout: float = READY_TIMEOUT) -> None:
    """Until 127.0.0.1:``port`` listens; fail early if one of ``procs`` exits.

    It looks at /proc/net/tcp rather than connecting, so that no proxy logs a probe as a
    failed handshake; it connects only where /proc cannot tell.
    """
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise PeerError(
                    f"{proc.name} exited with {proc.popen.returncode} before listening:\n"
                    f"{proc.log_tail()}"
                )
        listening = listening_ports()
        if port in listening if listening is not None else _accepts(port):
            return
        if time.monotonic() > deadline:
            raise PeerError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


def wait_for_log(proc: Proc, pattern: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while pattern not in proc.log_text():
        if proc.popen.poll() is not None:
            raise PeerError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise PeerError(f"{proc.name}: no {pattern!r} in its log after {timeout}s")
        time.sleep(0.05)


# ------------------------------------------------------------------------------ sockproxy


# ------------------------------------------------------------------------------ installing


def run_to_stderr(command: list[str], env: dict[str, str] | None = None) -> bool:
    """Run a command with its output on stderr (stdout is for the tables); True if it worked."""
    log(f"$ {shlex.join(command)}")
    return subprocess.run(command, env=env, stdout=sys.stderr, check=False).returncode == 0


def install_apt_peers() -> None:
    """apt-get install the peers (apt-get update first if that fails); failures are logged."""
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", *APT_PACKAGES]
    if not run_to_stderr(install, env):
        log("apt-get install failed; apt-get update, then again")
        run_to_stderr([*sudo, "apt-get", "update"], env)
        if not run_to_stderr(install, env):
            log("apt-get install failed: the missing peers will be skipped")


def git_revision() -> str:
    """``git describe --always --dirty`` of this checkout, or "?"."""
    result = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout.strip() or "?"
