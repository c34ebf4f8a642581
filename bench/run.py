#!/usr/bin/env python3
"""Benchmark sockproxy against its peers with socksbench, all on 127.0.0.1.

    python3 bench/run.py                                   # sockproxy + every installed peer
    python3 bench/run.py --peers direct,ssh --mb 50 --repeat 1
    python3 bench/run.py --install-peers                   # apt-get/pip install the peers first
    python3 bench/run.py --markdown /tmp/bench.md          # the tables to a file too

It generates fresh RSA keys (3072-bit by default) into a temporary folder, writes configs on
free loopback ports, starts the real server.py and local.py, runs socksbench against the local
with the proxy's PIDs (CPU and RSS), and stops both with SIGTERM (each must exit 0). The peers
are started the way /work/shared/bench/peers.md describes, on free ports, everything in the
temporary folder: OpenSSH ``ssh -D`` with aes256-gcm@openssh.com against a private sshd,
shadowsocks-libev (aes-256-gcm), pproxy (ss aes-256-gcm), microsocks, and ``--direct``. A peer
that is not installed is listed as such and skipped.

An extra socksbench run (``--tests concurrent``) opens ``--conns-big`` (1000) connections at
once. The raw JSON of every run goes to bench/results/<timestamp>.json; the tables go to stdout:
one row per proxy, then sockproxy's ratios to the ssh aes256-gcm row next to the targets.
Every process started here is stopped by PID at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOCKSBENCH = Path(__file__).resolve().parents[2] / "shared/bench/socksbench.py"
RESULTS_DIR = REPO / "bench" / "results"

PEERS = ("ssh", "ss", "pproxy", "microsocks", "direct")
APT_PACKAGES = ("openssh-server", "openssh-client", "shadowsocks-libev", "microsocks")
PPROXY_REQUIREMENT = "pproxy==2.7.9"
SS_PASSWORD = "benchpass"  # loopback only, a throwaway server
SSH_CIPHER = "aes256-gcm@openssh.com"

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
SHIPPED_MAX_CONNECTIONS = 1024

# Targets, from the brief: sockproxy against the ssh aes256-gcm row.
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_CONNECT_P50_RATIO = 2.0
TARGET_CONNECT_P99_RATIO = 3.0
TARGET_RR_RATIO = 2.0
TARGET_BIG_WALL_S = 3.0
TARGET_BIG_RSS_MB = 150.0

Json = dict[str, Any]
NONE = "\u2013"  # an en dash: no figure


class PeerError(Exception):
    """A peer could not be started or measured."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


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


def generate_keys(directory: Path, bits: int) -> None:
    """Fresh key pairs with the project's own tool: local_*.pem and server_*.pem."""
    command = [sys.executable, str(REPO / "utils/genkey.py"), "--dir", str(directory)]
    result = subprocess.run(
        [*command, "--bits", str(bits)], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        raise PeerError(f"genkey.py failed ({result.returncode}): {result.stderr.strip()}")


def write_configs(
    directory: Path,
    server_port: int,
    local_port: int,
    max_connections: int = SHIPPED_MAX_CONNECTIONS,
) -> tuple[Path, Path]:
    """server_config.json and local_config.json in ``directory`` (keys in ``directory/keys``)."""
    common = {
        "handshake_timeout": 10,
        "connect_timeout": 10,
        "idle_timeout": 300,
        "max_connections": max_connections,
    }
    server = {
        "server_address": "127.0.0.1",
        "server_port": server_port,
        "whitelist": ["127.0.0.1", "::1"],
        "local_public_key": "keys/local_public.pem",
        "server_private_key": "keys/server_private.pem",
        **common,
    }
    local = {
        "local_address": "127.0.0.1",
        "local_port": local_port,
        "auth": False,
        "whitelist": ["127.0.0.1", "::1"],
        "server_address": "127.0.0.1",
        "server_port": server_port,
        "server_public_key": "keys/server_public.pem",
        "local_private_key": "keys/local_private.pem",
        **common,
    }
    server_path, local_path = directory / "server_config.json", directory / "local_config.json"
    server_path.write_text(json.dumps(server, indent=4) + "\n")
    local_path.write_text(json.dumps(local, indent=4) + "\n")
    return server_path, local_path


@dataclass
class SockproxyPair:
    """The real server.py and local.py, running on loopback."""

    server: Proc
    local: Proc
    server_port: int
    local_port: int
    workdir: Path


def start_sockproxy(
    procs: Processes,
    workdir: Path,
    bits: int,
    *,
    log_level: str = "WARNING",
    max_connections: int = SHIPPED_MAX_CONNECTIONS,
) -> SockproxyPair:
    """Keys, configs, then server.py and local.py; returns once both accept connections."""
    workdir.mkdir(parents=True, exist_ok=True)
    generate_keys(workdir / "keys", bits)
    server_port, local_port = free_ports(2)
    server_cfg, local_cfg = write_configs(workdir, server_port, local_port, max_connections)
    options = ["--log-level", log_level]
    server = procs.start(
        "server.py",
        [sys.executable, str(REPO / "server.py"), "--config", str(server_cfg), *options],
        workdir / "server.log",
        cwd=REPO,
    )
    wait_for_port(server_port, [server])
    local = procs.start(
        "local.py",
        [sys.executable, str(REPO / "local.py"), "--config", str(local_cfg), *options],
        workdir / "local.log",
        cwd=REPO,
    )
    wait_for_port(local_port, [local, server])
    return SockproxyPair(server, local, server_port, local_port, workdir)


# ------------------------------------------------------------------------------ peers


@dataclass
class Running:
    """A started proxy: where its SOCKS5 port is, which PIDs to measure, how to stop it."""

    socks_port: int | None  # None: --direct
    pids: list[int]
    procs: list[Proc]  # in stop order
    must_exit_zero: bool = False  # sockproxy: SIGTERM must give exit code 0
    after: Callable[[PeerResult], None] | None = None  # extra checks once measured


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    procs: Processes


@dataclass
class PeerSpec:
    key: str
    label: Callable[[argparse.Namespace], str]
    missing: Callable[[], str | None]  # what is not installed, or None
    start: Callable[[Context], Running]


def _package_version(name: str) -> str:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", name],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "?"
    return result.stdout.strip() if result.returncode == 0 else "?"


def _python_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _missing_commands(*commands: str) -> str | None:
    absent = [c for c in commands if shutil.which(c) is None and not Path(c).is_file()]
    return f"missing: {', '.join(absent)}" if absent else None


# --- sockproxy


def sockproxy_max_connections(args: argparse.Namespace) -> int:
    """The shipped 1024, unless a concurrency run asks for more than fits."""
    wanted = max(args.conns, args.conns_big)
    return SHIPPED_MAX_CONNECTIONS if wanted <= 1000 else wanted + 64


def start_sockproxy_peer(ctx: Context) -> Running:
    pair = start_sockproxy(
        ctx.procs,
        ctx.tmp / "sockproxy",
        ctx.args.bits,
        max_connections=sockproxy_max_connections(ctx.args),
    )
    return Running(
        pair.local_port,
        [pair.local.pid, pair.server.pid],
        [pair.local, pair.server],
        must_exit_zero=True,
    )


# --- OpenSSH


def _sshd_config(directory: Path, port: int) -> str:
    return "\n".join(
        [
            "ListenAddress 127.0.0.1",
            f"Port {port}",
            f"HostKey {directory / 'hostkey'}",
            f"PidFile {directory / 'sshd.pid'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "",
        ]
    )


def start_ssh(ctx: Context) -> Running:
    directory = ctx.tmp / "ssh"
    directory.mkdir()
    for name in ("hostkey", "userkey"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)],
            check=True,
            timeout=60,
        )
    shutil.copy(directory / "userkey.pub", directory / "authorized_keys")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
    sshd_port, socks_port = free_ports(2)
    (directory / "sshd_config").write_text(_sshd_config(directory, sshd_port))
    sshd = ctx.procs.start(
        "sshd",
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(directory / "sshd_config")],
        directory / "sshd.log",
    )
    wait_for_log(sshd, f"Server listening on 127.0.0.1 port {sshd_port}")
    options = [
        "-p",
        str(sshd_port),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        f"UserKnownHostsFile={directory / 'known_hosts'}",
        "-o",
        "BatchMode=yes",
        "-o",
        "ExitOnForwardFailure=yes",
        "-i",
        str(directory / "userkey"),
        "-c",
        SSH_CIPHER,
    ]
    client = ctx.procs.start(
        "ssh",
        ["ssh", "-N", "-D", f"127.0.0.1:{socks_port}", *options, "root@127.0.0.1"],
        directory / "ssh.log",
    )
    wait_for_port(socks_port, [client, sshd])
    # Measured: the ssh client and the sshd session process(es), not the idle listener.
    sessions = children_of(sshd.pid)

    def check_cipher(result: PeerResult) -> None:
        probe = subprocess.run(
            ["ssh", "-v", *options, "root@127.0.0.1", "true"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        ciphers = sorted(set(re.findall(r"kex: \S+ cipher: (\S+)", probe.stderr)))
        result.notes.append(f"negotiated cipher: {', '.join(ciphers) or 'unknown'}")

    return Running(socks_port, [client.pid, *sessions], [client, sshd], after=check_cipher)


def ssh_label(_args: argparse.Namespace) -> str:
    version = _package_version("openssh-client").split(":")[-1].split("-")[0]
    return f"OpenSSH {version} `-D -c {SSH_CIPHER}`"


# --- shadowsocks-libev


def start_ss(ctx: Context) -> Running:
    directory = ctx.tmp / "ss"
    directory.mkdir()
    server_port, socks_port = free_ports(2)
    common = ["-k", SS_PASSWORD, "-m", "aes-256-gcm", "-t", "60"]
    server = ctx.procs.start(
        "ss-server",
        ["ss-server", "-s", "127.0.0.1", "-p", str(server_port), *common],
        directory / "ss-server.log",
    )
    wait_for_port(server_port, [server])
    local = ctx.procs.start(
        "ss-local",
        [
            "ss-local",
            *("-s", "127.0.0.1", "-p", str(server_port)),
            *("-b", "127.0.0.1", "-l", str(socks_port)),
            *common,
        ],
        directory / "ss-local.log",
    )
    wait_for_port(socks_port, [local, server])
    return Running(socks_port, [local.pid, server.pid], [local, server])


def ss_label(_args: argparse.Namespace) -> str:
    version = _package_version("shadowsocks-libev").split("+")[0]
    return f"shadowsocks-libev {version}, aes-256-gcm"


# --- pproxy


def pproxy_command() -> list[str] | None:
    beside = Path(sys.executable).parent / "pproxy"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("pproxy")
    if found:
        return [found]
    importlib.invalidate_caches()
    if importlib.util.find_spec("pproxy") is not None:
        return [sys.executable, "-m", "pproxy"]
    return None


def pproxy_missing() -> str | None:
    if pproxy_command() is None:
        return "missing: pproxy"
    importlib.invalidate_caches()
    if importlib.util.find_spec("Crypto") is None:
        return "missing: pycryptodome (pproxy needs it for aes-256-gcm)"
    return None


def start_pproxy(ctx: Context) -> Running:
    directory = ctx.tmp / "pproxy"
    directory.mkdir()
    command = pproxy_command()
    assert command is not None
    server_port, socks_port = free_ports(2)
    remote = f"ss://aes-256-gcm:{SS_PASSWORD}@127.0.0.1:{server_port}"
    server = ctx.procs.start("pproxy server", [*command, "-l", remote], directory / "server.log")
    wait_for_port(server_port, [server])
    local = ctx.procs.start(
        "pproxy local",
        [*command, "-l", f"socks5://127.0.0.1:{socks_port}", "-r", remote],
        directory / "local.log",
    )
    wait_for_port(socks_port, [local, server])
    return Running(socks_port, [local.pid, server.pid], [local, server])


def pproxy_label(_args: argparse.Namespace) -> str:
    return f"pproxy {_python_version('pproxy')} (pycryptodome {_python_version('pycryptodome')})"


# --- microsocks and direct


def start_microsocks(ctx: Context) -> Running:
    directory = ctx.tmp / "microsocks"
    directory.mkdir()
    (port,) = free_ports(1)
    proc = ctx.procs.start(
        "microsocks",
        ["microsocks", "-i", "127.0.0.1", "-p", str(port)],
        directory / "microsocks.log",
    )
    wait_for_port(port, [proc])
    return Running(port, [proc.pid], [proc])


def start_direct(_ctx: Context) -> Running:
    return Running(None, [], [])


SOCKPROXY = PeerSpec(
    "sockproxy",
    lambda args: f"**sockproxy** (RSA-{args.bits}, AES-256-GCM 64 B cells)",
    lambda: None,
    start_sockproxy_peer,
)
PEER_SPECS = {
    "ssh": PeerSpec(
        "ssh",
        ssh_label,
        lambda: _missing_commands("/usr/sbin/sshd", "ssh", "ssh-keygen"),
        start_ssh,
    ),
    "ss": PeerSpec("ss", ss_label, lambda: _missing_commands("ss-server", "ss-local"), start_ss),
    "pproxy": PeerSpec("pproxy", pproxy_label, pproxy_missing, start_pproxy),
    "microsocks": PeerSpec(
        "microsocks",
        lambda _a: f"microsocks {_package_version('microsocks').split('-')[0]} (no crypto)",
        lambda: _missing_commands("microsocks"),
        start_microsocks,
    ),
    "direct": PeerSpec("direct", lambda _a: "direct (loopback limit)", lambda: None, start_direct),
}


# ------------------------------------------------------------------------------ measuring


@dataclass
class PeerResult:
    key: str
    label: str
    status: str = "not run"  # "ok", "not installed", "failed: ..."
    bench: Json | None = None
    big: Json | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log_lines: dict[str, list[str]] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)


def run_socksbench(ctx: Context, target: list[str], extra: list[str], pids: list[int]) -> Json:
    args = ctx.args
    command = [sys.executable, str(args.socksbench), *target, *extra]
    if pids:
        command += ["--pids", ",".join(str(p) for p in pids)]
    if args.timeout is not None:
        command += ["--timeout", str(args.timeout)]
    command += ["--max-seconds", str(args.max_seconds)]
    proc = ctx.procs.start("socksbench", command, None, pipe_stdout=True)
    try:
        out, _ = proc.popen.communicate(timeout=args.max_seconds + 120)
    except subprocess.TimeoutExpired:
        ctx.procs.stop(proc)
        return {"errors": ["socksbench did not finish"], "command": command}
    ctx.procs.forget(proc)
    lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    try:
        data: Json = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        data = {"errors": [f"socksbench printed no JSON: {lines[-3:]}"]}
    data["socksbench_exit"] = proc.popen.returncode
    data["command"] = command
    return data


def main_bench_args(args: argparse.Namespace) -> list[str]:
    extra = ["--mb", str(args.mb), "--repeat", str(args.repeat), "--conns", str(args.conns)]
    if args.connects is not None:
        extra += ["--connects", str(args.connects)]
    if args.rr is not None:
        extra += ["--rr", str(args.rr)]
    return extra


def big_bench_args(args: argparse.Namespace) -> list[str]:
    return ["--tests", "concurrent", "--conns", str(args.conns_big), "--repeat", "1"]


LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception")


def problem_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if LOG_PROBLEM.search(line)]


def bench_peer(ctx: Context, spec: PeerSpec, results: list[PeerResult]) -> None:
    """Start, measure and stop one proxy; its result is in ``results`` even if interrupted."""
    result = PeerResult(spec.key, spec.label(ctx.args))
    results.append(result)
    missing = spec.missing()
    if missing is not None:
        result.status = "not installed"
        result.notes.append(missing)
        log(f"{spec.key}: not installed ({missing}), skipped")
        return
    running: Running | None = None
    try:
        running = spec.start(ctx)
        for proc in running.procs:
            result.commands[proc.name] = proc.command
        target = ["--socks", f"127.0.0.1:{running.socks_port}"]
        if running.socks_port is None:
            target = ["--direct"]
        result.bench = run_socksbench(ctx, target, main_bench_args(ctx.args), running.pids)
        if ctx.args.conns_big > 0:
            result.big = run_socksbench(ctx, target, big_bench_args(ctx.args), running.pids)
        if running.after is not None:
            running.after(result)
        result.status = "ok"
    except (PeerError, OSError, subprocess.SubprocessError) as exc:
        result.status = "failed"
        result.problems.append(f"{spec.key} failed: {exc}")
        log(f"{spec.key} FAILED: {exc}")
    finally:
        if running is not None:
            stop_running(ctx, running, result)
    for name, data in (("main run", result.bench), ("concurrency run", result.big)):
        for error in (data or {}).get("errors", []):
            result.problems.append(f"socksbench {name}: {error}")


def stop_running(ctx: Context, running: Running, result: PeerResult) -> None:
    for proc in running.procs:
        stopped = ctx.procs.stop(proc)
        result.exit_codes[proc.name] = stopped.exit_code
        if running.must_exit_zero and (stopped.forced or stopped.exit_code != 0):
            how = "did not stop within" if stopped.forced else "exited with"
            detail = f"{STOP_TIMEOUT:.0f}s" if stopped.forced else str(stopped.exit_code)
            result.problems.append(f"{proc.name} {how} {detail} after SIGTERM")
        if running.must_exit_zero:
            lines = problem_lines(proc.log_text())
        else:
            lines = proc.log_text().splitlines()[-20:]  # a peer's log: only its tail
        if lines:
            result.log_lines[proc.name] = lines


# ------------------------------------------------------------------------------ report


def _num(value: Any, digits: int = 1) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return NONE
    if digits == 0:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _pair(a: Any, b: Any, digits: int) -> str:
    if a is None and b is None:
        return NONE
    return f"{_num(a, digits)} / {_num(b, digits)}"


def cpu_per_gb(bench: Json, test: str, mb: float) -> float | None:
    cpu = bench.get(f"{test}_proxy_cpu_s")
    if not isinstance(cpu, int | float) or not bench.get(f"{test}_ok"):
        return None
    return float(cpu) / (mb * 1e6 / 1e9)


def _conc(data: Json | None) -> str:
    if not data or data.get("concurrent_total") is None:
        return NONE
    ok, total, wall = data.get("concurrent_ok"), data["concurrent_total"], data.get("concurrent_s")
    mark = "" if ok == total else "**"
    return f"{mark}{ok}/{total}{mark}, {_num(wall, 2)}"


def _halfclose(bench: Json, key: str) -> str:
    if key == "direct":
        return NONE
    value = bench.get("halfclose_ok")
    return NONE if value is None else ("**yes**" if value else "no")


def main_table(results: list[PeerResult], args: argparse.Namespace) -> list[str]:
    head = [
        "proxy",
        "download MB/s",
        "upload MB/s",
        "CPU s/GB down / up",
        "connect p50 / p99 ms",
        "rr p50 µs",
        f"{args.conns} conns ok/total, wall s",
        f"{args.conns_big} conns ok/total, wall s",
        f"peak RSS MB ({args.conns} / {args.conns_big} conns)",
        "half-close",
    ]
    rows = [head, ["---"] + ["---:"] * (len(head) - 2) + [":---:"]]
    for res in results:
        if res.bench is None:
            rows.append([res.label, res.status] + [""] * (len(head) - 2))
            continue
        b, big = res.bench, res.big or {}
        rows.append(
            [
                res.label,
                _num(b.get("download_MBps")),
                _num(b.get("upload_MBps")),
                _pair(cpu_per_gb(b, "download", args.mb), cpu_per_gb(b, "upload", args.mb), 1),
                _pair(b.get("connect_ms_p50"), b.get("connect_ms_p99"), 2),
                _num(b.get("rr_us_p50"), 0),
                _conc(b),
                _conc(res.big),
                _pair(b.get("concurrent_peak_rss_MB"), big.get("concurrent_peak_rss_MB"), 1),
                _halfclose(b, res.key),
            ]
        )
    return ["| " + " | ".join(row) + " |" for row in rows]


def _ratio(ours: Any, theirs: Any) -> float | None:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float) or not theirs:
        return None
    return float(ours) / float(theirs)


def _verdict(ok: bool | None) -> str:
    return NONE if ok is None else ("yes" if ok else "**NO**")


def ratio_table(ours: PeerResult | None, ssh: PeerResult | None) -> list[str]:
    o = (ours.bench if ours else None) or {}
    s = (ssh.bench if ssh else None) or {}
    rows = [
        ["metric", "sockproxy", "ssh aes256-gcm", "ratio ours/ssh", "target", "met"],
        ["---", "---:", "---:", "---:", "---", ":---:"],
    ]
    checks = [
        ("download MB/s", "download_MBps", 1, ">= 0.5x", TARGET_THROUGHPUT_RATIO, True),
        ("upload MB/s", "upload_MBps", 1, ">= 0.5x", TARGET_THROUGHPUT_RATIO, True),
        ("connect p50 ms", "connect_ms_p50", 2, "<= 2x", TARGET_CONNECT_P50_RATIO, False),
        ("connect p99 ms", "connect_ms_p99", 2, "<= 3x", TARGET_CONNECT_P99_RATIO, False),
        ("rr p50 µs", "rr_us_p50", 0, "<= 2x", TARGET_RR_RATIO, False),
    ]
    for name, key, digits, target, bound, higher_is_better in checks:
        ratio = _ratio(o.get(key), s.get(key))
        met = None if ratio is None else (ratio >= bound if higher_is_better else ratio <= bound)
        shown = NONE if ratio is None else f"{ratio:.2f}x"
        rows.append([name, _num(o.get(key), digits), _num(s.get(key), digits), shown, target])
        rows[-1].append(_verdict(met))
    ob = (ours.big if ours else None) or {}
    sb = (ssh.big if ssh else None) or {}
    if ob:
        total = ob.get("concurrent_total")
        all_ok = ob.get("concurrent_ok") == total
        wall = ob.get("concurrent_s")
        fast = isinstance(wall, int | float) and wall <= TARGET_BIG_WALL_S
        rows.append(
            [
                f"{total} connections at once",
                _conc(ob),
                _conc(sb) if sb else NONE,
                NONE,
                f"all ok, <= {TARGET_BIG_WALL_S:.0f} s",
                _verdict(all_ok and fast),
            ]
        )
        rss = ob.get("concurrent_peak_rss_MB")
        rss_ok = None if not isinstance(rss, int | float) else rss <= TARGET_BIG_RSS_MB
        rows.append(
            [
                f"peak RSS MB, {total} connections",
                _num(rss),
                _num(sb.get("concurrent_peak_rss_MB")),
                _fmt_ratio(_ratio(rss, sb.get("concurrent_peak_rss_MB"))),
                f"<= {TARGET_BIG_RSS_MB:.0f} MB",
                _verdict(rss_ok),
            ]
        )
    return ["| " + " | ".join(row) + " |" for row in rows]


def _fmt_ratio(ratio: float | None) -> str:
    return NONE if ratio is None else f"{ratio:.2f}x"


def machine_info(args: argparse.Namespace) -> Json:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*command: str) -> str:
        try:
            result = subprocess.run(
                ["git", *command], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            return ""
        return result.stdout.strip()

    changes = git("status", "--porcelain", "--untracked-files=no")
    socksbench_sha = "?"
    with contextlib.suppress(OSError):
        socksbench_sha = hashlib.sha256(Path(args.socksbench).read_bytes()).hexdigest()[:12]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "git_commit": git("rev-parse", "HEAD"),
        "git_local_changes": bool(changes),
        "socksbench": str(args.socksbench),
        "socksbench_sha256_12": socksbench_sha,
        "argv": sys.argv,
    }


def render(meta: Json, results: list[PeerResult], args: argparse.Namespace) -> str:
    commit = meta["git_commit"][:12] + (
        " + uncommitted changes" if meta["git_local_changes"] else ""
    )
    load = ", ".join(str(x) for x in meta["load_average_at_start"])
    settings = (
        f"socksbench `{' '.join(main_bench_args(args))}`"
        + (f" `--timeout {args.timeout}`" if args.timeout is not None else "")
        + f"; concurrency run `{' '.join(big_bench_args(args))}`"
        + f"; sockproxy RSA-{args.bits}, max_connections {sockproxy_max_connections(args)}"
    )
    out = [
        "# sockproxy vs peers (socksbench, loopback)",
        "",
        f"- date: {meta['date']}",
        f"- machine: nproc {meta['nproc']}, CPU {meta['cpu_model']}, kernel {meta['kernel']}, "
        f"load average at start {load}",
        f"- Python {meta['python']} ({meta['python_executable']})",
        f"- git commit: {commit}",
        f"- {settings}",
        f"- command: `{shlex.join([sys.executable, *meta['argv']])}`",
        "",
    ]
    out += main_table(results, args)
    out += [
        "",
        "CPU s/GB: proxy CPU seconds (all measured processes) per 10^9 bytes moved; "
        "RSS: sum over the proxy's processes, sampled every 50 ms during the concurrency test.",
        "",
        "## sockproxy against the ssh aes256-gcm row",
        "",
    ]
    by_key = {r.key: r for r in results}
    ssh = by_key.get("ssh")
    out += ratio_table(by_key.get("sockproxy"), ssh if ssh and ssh.bench else None)
    if not (ssh and ssh.bench):
        out += ["", "(no ssh row in this run: no ratios)"]
    notes = []
    for res in results:
        for problem in res.problems:
            notes.append(f"- **{res.key}**: {problem}")
        for note in res.notes:
            notes.append(f"- {res.key}: {note}")
        if res.key == "sockproxy":
            for name, lines in res.log_lines.items():
                notes.append(f"- **sockproxy {name}**: {len(lines)} warning/error log line(s):")
                notes += [f"    `{line}`" for line in summarize_lines(lines)]
    if notes:
        out += ["", "## Notes", "", *notes]
    return "\n".join(out) + "\n"


def summarize_lines(lines: list[str], limit: int = 12) -> list[str]:
    """Distinct messages (timestamps, numbers and addresses masked) with their counts."""
    counts: dict[str, tuple[int, str]] = {}
    for line in lines:
        body = re.sub(r"^\S+ \S+ ", "", line)  # the timestamp
        key = re.sub(r"\d+", "N", body)
        count, first = counts.get(key, (0, line))
        counts[key] = (count + 1, first)
    ranked = sorted(counts.values(), key=lambda item: -item[0])
    shown = [f"{count}x {first}" if count > 1 else first for count, first in ranked[:limit]]
    if len(ranked) > limit:
        shown.append(f"... and {len(ranked) - limit} more kinds")
    return shown


# ------------------------------------------------------------------------------ main


def _run_to_stderr(command: list[str], env: dict[str, str] | None = None) -> bool:
    """Run a command with its output on stderr (stdout is for the tables); True if it worked."""
    log(f"$ {shlex.join(command)}")
    return subprocess.run(command, env=env, stdout=sys.stderr, check=False).returncode == 0


def install_peers() -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", *APT_PACKAGES]
    if not _run_to_stderr(install, env):
        log("apt-get install failed; apt-get update, then again")
        _run_to_stderr([*sudo, "apt-get", "update"], env)
        if not _run_to_stderr(install, env):
            log("apt-get install failed: the missing peers will be skipped")
    if not _run_to_stderr([sys.executable, "-m", "pip", "install", PPROXY_REQUIREMENT]):
        log("pip install failed: pproxy will be skipped if missing")


def _peer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; known: {','.join(PEERS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--peers", type=_peer_list, default=list(PEERS), help=",".join(PEERS))
    p.add_argument("--no-sockproxy", action="store_true", help="measure only the peers")
    p.add_argument("--install-peers", action="store_true", help="apt-get/pip install them first")
    p.add_argument("--socksbench", type=Path, default=DEFAULT_SOCKSBENCH)
    p.add_argument("--bits", type=int, default=3072, help="sockproxy RSA key size [3072]")
    p.add_argument("--mb", type=float, default=200, help="MB per download/upload [200]")
    p.add_argument("--repeat", type=int, default=3, help="socksbench runs, medians [3]")
    p.add_argument("--conns", type=int, default=200, help="concurrent connections [200]")
    p.add_argument(
        "--conns-big", type=int, default=1000, help="extra concurrency run [1000]; 0: off"
    )
    p.add_argument("--connects", type=int, help="sequential connects (socksbench default 200)")
    p.add_argument("--rr", type=int, help="echo round trips (socksbench default 2000)")
    p.add_argument("--timeout", type=float, help="socksbench per-socket timeout (default 30)")
    p.add_argument("--max-seconds", type=float, default=900, help="socksbench deadline per run")
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args(argv)
    args.socksbench = args.socksbench.resolve()
    return args


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.socksbench.is_file():
        print(f"run.py: no socksbench at {args.socksbench} (use --socksbench)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    meta = machine_info(args)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="sockproxy-bench-"))
    results: list[PeerResult] = []
    interrupted = False
    try:
        if args.install_peers:
            install_peers()
        ctx = Context(args, tmp, procs)
        specs = ([] if args.no_sockproxy else [SOCKPROXY]) + [PEER_SPECS[k] for k in args.peers]
        for spec in specs:
            log(f"===== {spec.key}")
            bench_peer(ctx, spec, results)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
        if results and results[-1].status == "not run":
            results[-1].status = "interrupted"
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    markdown = render(meta, results, args)
    print(markdown)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    raw = {"meta": meta, "args": _jsonable(vars(args)), "peers": [asdict(r) for r in results]}
    raw_path = RESULTS_DIR / f"{stamp}.json"
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    log(f"raw results: {raw_path}")
    if args.markdown is not None:
        args.markdown.write_text(markdown)
        log(f"tables: {args.markdown}")
    if interrupted:
        return 130
    ours = next((r for r in results if r.key == "sockproxy"), None)
    return 1 if ours is not None and (ours.problems or ours.status != "ok") else 0


def _jsonable(values: dict[str, Any]) -> Json:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


if __name__ == "__main__":
    sys.exit(main())
