"""Starting sockproxy and its peers on loopback, each split at its network link.

Shared by bench/run.py (socksbench, no link) and bench/wan.py (a delay relay on the link).
Every system has a client half and a server half; ``link`` maps the port the server half
listens on to the port the client half dials, so a caller can put a relay in between:

- sockproxy: local.py -> link -> server.py (the local's ``server_port``);
- OpenSSH: ``ssh -N -D`` -> link -> a private sshd on 127.0.0.1 (aes256-gcm@openssh.com);
- shadowsocks-libev: ss-local -> link -> ss-server (aes-256-gcm);
- pproxy: its local -> link -> its ss server;
- microsocks has no client half: the SOCKS client reaches it across the link.

The peers are started the way /work/shared/bench/peers.md describes, on free ports, with
everything in a folder the caller gives.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import (
    PeerError,
    Proc,
    Processes,
    children_of,
    free_ports,
    wait_for_log,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[1]
SS_PASSWORD = "benchpass"  # loopback only, a throwaway server
SSH_CIPHER = "aes256-gcm@openssh.com"
SHIPPED_MAX_CONNECTIONS = 1024

Link = Callable[[int], int]  # the server half's port -> the port the client half dials


def no_link(port: int) -> int:
    """The client half dials the server half directly."""
    return port


@dataclass
class Running:
    """A started proxy: where its SOCKS5 port is, which PIDs to measure, how to stop it."""

    socks_port: int | None  # None: no proxy (run.py's --direct)
    pids: list[int]
    procs: list[Proc]  # in stop order
    must_exit_zero: bool = False  # sockproxy: SIGTERM must give exit code 0
    notes: Callable[[], list[str]] | None = None  # facts to report once measured


def package_version(name: str) -> str:
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


def python_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def missing_commands(*commands: str) -> str | None:
    absent = [c for c in commands if shutil.which(c) is None and not Path(c).is_file()]
    return f"missing: {', '.join(absent)}" if absent else None


# ------------------------------------------------------------------------------ sockproxy


def generate_keys(directory: Path, bits: int) -> None:
    """Fresh key pairs with the project's own tool: local_*.pem and server_*.pem."""
    command = [sys.executable, str(REPO / "utils/genkey.py"), "--dir", str(directory)]
    result = subprocess.run(
        [*command, "--bits", str(bits)], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        raise PeerError(f"genkey.py failed ({result.returncode}): {result.stderr.strip()}")


def _common_config(max_connections: int) -> dict[str, Any]:
    return {
        "handshake_timeout": 10,
        "connect_timeout": 10,
        "idle_timeout": 300,
        "max_connections": max_connections,
    }


def server_config(server_port: int, max_connections: int) -> dict[str, Any]:
    """server.py's config; key paths are relative to the config file's folder."""
    return {
        "server_address": "127.0.0.1",
        "server_port": server_port,
        "whitelist": ["127.0.0.1", "::1"],
        "local_public_key": "keys/local_public.pem",
        "server_private_key": "keys/server_private.pem",
        **_common_config(max_connections),
    }


def local_config(
    local_port: int, server_port: int, max_connections: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """local.py's config, with ``extra`` merged over it (fields the caller adds or changes)."""
    return {
        "local_address": "127.0.0.1",
        "local_port": local_port,
        "auth": False,
        "whitelist": ["127.0.0.1", "::1"],
        "server_address": "127.0.0.1",
        "server_port": server_port,
        "server_public_key": "keys/server_public.pem",
        "local_private_key": "keys/local_private.pem",
        **_common_config(max_connections),
        **(extra or {}),
    }


def _write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config, indent=4) + "\n")
    return path


@dataclass
class SockproxyPair:
    """The real server.py and local.py, running on loopback."""

    server: Proc
    local: Proc
    server_port: int
    local_port: int
    workdir: Path


@dataclass(frozen=True)
class SockproxyOptions:
    log_level: str = "WARNING"
    max_connections: int = SHIPPED_MAX_CONNECTIONS
    local_extra: dict[str, Any] | None = None  # merged into the local's config


def _program(script: str, config: Path, log_level: str) -> list[str]:
    return [sys.executable, str(REPO / script), "--config", str(config), "--log-level", log_level]


def start_sockproxy_server(
    procs: Processes, workdir: Path, options: SockproxyOptions
) -> tuple[Proc, int]:
    """server.py on a free port (keys in ``workdir/keys``); returns once it listens."""
    (port,) = free_ports(1)
    config = _write_config(
        workdir / "server_config.json", server_config(port, options.max_connections)
    )
    server = procs.start(
        "server.py",
        _program("server.py", config, options.log_level),
        workdir / "server.log",
        cwd=REPO,
    )
    wait_for_port(port, [server])
    return server, port


def start_sockproxy_local(
    procs: Processes, workdir: Path, server_port: int, options: SockproxyOptions
) -> tuple[Proc, int]:
    """local.py on a free port, dialing ``server_port``; returns once it listens."""
    (port,) = free_ports(1)
    config = local_config(port, server_port, options.max_connections, options.local_extra)
    path = _write_config(workdir / "local_config.json", config)
    local = procs.start(
        "local.py", _program("local.py", path, options.log_level), workdir / "local.log", cwd=REPO
    )
    wait_for_port(port, [local])
    return local, port


def start_sockproxy(
    procs: Processes,
    workdir: Path,
    bits: int,
    *,
    link: Link = no_link,
    options: SockproxyOptions | None = None,
) -> SockproxyPair:
    """Keys (unless ``workdir/keys`` has them), configs, server.py, then local.py."""
    options = options or SockproxyOptions()
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "keys" / "server_private.pem").is_file():
        generate_keys(workdir / "keys", bits)
    server, server_port = start_sockproxy_server(procs, workdir, options)
    local, local_port = start_sockproxy_local(procs, workdir, link(server_port), options)
    if server.popen.poll() is not None:
        raise PeerError(f"server.py exited with {server.popen.returncode}:\n{server.log_tail()}")
    return SockproxyPair(server, local, server_port, local_port, workdir)


# ------------------------------------------------------------------------------ OpenSSH


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


def _ssh_options(directory: Path, port: int) -> list[str]:
    return [
        *("-p", str(port)),
        *("-o", "StrictHostKeyChecking=no"),
        *("-o", f"UserKnownHostsFile={directory / 'known_hosts'}"),
        *("-o", "BatchMode=yes"),
        *("-o", "ExitOnForwardFailure=yes"),
        *("-i", str(directory / "userkey")),
        *("-c", SSH_CIPHER),
    ]


def start_ssh(procs: Processes, directory: Path, link: Link = no_link) -> Running:
    """A private sshd and ``ssh -N -D`` (forced aes256-gcm) through ``link``."""
    directory.mkdir(parents=True)
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
    sshd = procs.start(
        "sshd",
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(directory / "sshd_config")],
        directory / "sshd.log",
    )
    wait_for_log(sshd, f"Server listening on 127.0.0.1 port {sshd_port}")
    options = _ssh_options(directory, link(sshd_port))
    client = procs.start(
        "ssh",
        ["ssh", "-N", "-D", f"127.0.0.1:{socks_port}", *options, "root@127.0.0.1"],
        directory / "ssh.log",
    )
    wait_for_port(socks_port, [client, sshd])
    # Measured: the ssh client and the sshd session process(es), not the idle listener.
    sessions = children_of(sshd.pid)

    def negotiated_cipher() -> list[str]:
        probe = subprocess.run(
            ["ssh", "-v", *_ssh_options(directory, sshd_port), "root@127.0.0.1", "true"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        ciphers = sorted(set(re.findall(r"kex: \S+ cipher: (\S+)", probe.stderr)))
        return [f"negotiated cipher: {', '.join(ciphers) or 'unknown'}"]

    return Running(socks_port, [client.pid, *sessions], [client, sshd], notes=negotiated_cipher)


def ssh_label() -> str:
    version = package_version("openssh-client").split(":")[-1].split("-")[0]
    return f"OpenSSH {version} `-D -c {SSH_CIPHER}`"


def ssh_missing() -> str | None:
    return missing_commands("/usr/sbin/sshd", "ssh", "ssh-keygen")


# ------------------------------------------------------------------------------ shadowsocks


def start_ss(procs: Processes, directory: Path, link: Link = no_link) -> Running:
    """ss-server and ss-local (aes-256-gcm), the local dialing through ``link``."""
    directory.mkdir(parents=True)
    server_port, socks_port = free_ports(2)
    common = ["-k", SS_PASSWORD, "-m", "aes-256-gcm", "-t", "60"]
    server = procs.start(
        "ss-server",
        ["ss-server", "-s", "127.0.0.1", "-p", str(server_port), *common],
        directory / "ss-server.log",
    )
    wait_for_port(server_port, [server])
    local = procs.start(
        "ss-local",
        [
            "ss-local",
            *("-s", "127.0.0.1", "-p", str(link(server_port))),
            *("-b", "127.0.0.1", "-l", str(socks_port)),
            *common,
        ],
        directory / "ss-local.log",
    )
    wait_for_port(socks_port, [local, server])
    return Running(socks_port, [local.pid, server.pid], [local, server])


def ss_label() -> str:
    version = package_version("shadowsocks-libev").split("+")[0]
    return f"shadowsocks-libev {version}, aes-256-gcm"


def ss_missing() -> str | None:
    return missing_commands("ss-server", "ss-local")


# ------------------------------------------------------------------------------ pproxy


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


def start_pproxy(procs: Processes, directory: Path, link: Link = no_link) -> Running:
    """pproxy's ss server (aes-256-gcm) and its SOCKS5 local, dialing through ``link``."""
    directory.mkdir(parents=True)
    command = pproxy_command()
    assert command is not None
    server_port, socks_port = free_ports(2)
    listen = f"ss://aes-256-gcm:{SS_PASSWORD}@127.0.0.1:{server_port}"
    remote = f"ss://aes-256-gcm:{SS_PASSWORD}@127.0.0.1:{link(server_port)}"
    server = procs.start("pproxy server", [*command, "-l", listen], directory / "server.log")
    wait_for_port(server_port, [server])
    local = procs.start(
        "pproxy local",
        [*command, "-l", f"socks5://127.0.0.1:{socks_port}", "-r", remote],
        directory / "local.log",
    )
    wait_for_port(socks_port, [local, server])
    return Running(socks_port, [local.pid, server.pid], [local, server])


def pproxy_label() -> str:
    return f"pproxy {python_version('pproxy')} (pycryptodome {python_version('pycryptodome')})"


# ------------------------------------------------------------------------------ microsocks


def start_microsocks(procs: Processes, directory: Path, link: Link = no_link) -> Running:
    """microsocks; the SOCKS client reaches it through ``link`` (it has no client half)."""
    directory.mkdir(parents=True)
    (port,) = free_ports(1)
    proc = procs.start(
        "microsocks",
        ["microsocks", "-i", "127.0.0.1", "-p", str(port)],
        directory / "microsocks.log",
    )
    wait_for_port(port, [proc])
    return Running(link(port), [proc.pid], [proc])


def microsocks_label() -> str:
    return f"microsocks {package_version('microsocks').split('-')[0]} (no crypto)"


def microsocks_missing() -> str | None:
    return missing_commands("microsocks")
