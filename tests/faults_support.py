"""What tests/test_faults.py and scripts/harden.py share: attacks, faults and their measures.

Each scenario starts the real ``server.py``/``local.py`` through a ``tests.conftest.Launcher``,
attacks or breaks something, measures what happened (close times, bytes delivered and
whether they were right, file descriptors and threads of the programs before and after)
and returns a report. ``report.problems()`` lists every broken expectation (empty when
all is well); the tests assert on it and on details, ``scripts/harden.py`` prints
``report.row()`` in its table. Nothing listens anywhere but 127.0.0.1, every socket has a
timeout, and each scenario stops what it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    Launcher,
    Program,
    TCPServer,
    access_lines,
    socks_request,
    wait_for,
)
from utils.channel import Deadline, recv_some
from utils.handshake import ClientHandshake, ServerPublic
from utils.keys import RsaKey
from utils.socks5 import Reply, build_greeting
from utils.workers import WORKERS, WorkerPool

IO_TIMEOUT = 10.0  # every socket a scenario opens gets at least this bound
PATTERN_SIZE = (1 << 20) + 13  # not a power of two: a shifted copy never looks right
PATTERN = hashlib.shake_256(b"sockproxy fault pattern").digest(PATTERN_SIZE)
_PATTERN_TWICE = PATTERN + PATTERN
CHUNK = 256 * 1024
SIZE_HEADER = struct.Struct(">Q")
ENDLESS = 0  # a size of 0 asks the source for a stream without end
DOWNLOAD_SIZE = 5 * 1024 * 1024


# --------------------------------------------------------------------------- process accounting


@dataclass(frozen=True)
class ProcStats:
    """What a program holds: open file descriptors, threads, resident memory."""

    fds: int
    threads: int
    rss_kb: int

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.threads} threads, {self.rss_kb} kB RSS"


def proc_stats(pid: int) -> ProcStats:
    """Read /proc/PID/fd and /proc/PID/status (Threads, VmRSS)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return ProcStats(fds, int(fields["Threads"]), int(fields["VmRSS"].split()[0]))


def _pool_max_idle() -> int:
    """How many idle worker threads the programs keep after a burst (utils/workers.py)."""
    default = inspect.signature(WorkerPool.__init__).parameters["max_idle"].default
    kept = getattr(WORKERS, "_max_idle", default)
    return int(kept) if isinstance(kept, int) else 0


#: Idle pooled threads may outlive the connections they served (for the pool's keep_idle).
POOL_MAX_IDLE = _pool_max_idle()
POOL_KEEP_IDLE = float(getattr(WORKERS, "_keep_idle", 0.0))


@dataclass
class Settings:
    """Knobs the tests and scripts/harden.py set differently."""

    #: Wait (up to the pool's keep_idle + 1 s) for idle pooled threads to exit too, so that
    #: "threads after" is the real baseline; without it idle pooled threads are tolerated.
    wait_for_idle_pool: bool = False


SETTINGS = Settings()

_LIVE = re.compile(r"sockproxy: (\d+) live connection\(s\)")


def live_connections(program: Program, timeout: float = 3.0) -> int | None:
    """SIGUSR1 the program and read the number of live connections it logs (None: no answer)."""
    before = len(_LIVE.findall(program.stderr()))
    program.proc.send_signal(signal.SIGUSR1)
    found: list[str] = []

    def answered() -> bool:
        found[:] = _LIVE.findall(program.stderr())
        return len(found) > before

    return int(found[-1]) if wait_for(answered, timeout, step=0.05) else None


def back_to_baseline(stats: ProcStats, baseline: ProcStats) -> bool:
    """All fds back; threads back, but for idle pooled workers (at most POOL_MAX_IDLE)."""
    return stats.fds <= baseline.fds and stats.threads <= baseline.threads + POOL_MAX_IDLE


def settle(program: Program, baseline: ProcStats, timeout: float = 10.0) -> tuple[ProcStats, int]:
    """Wait until the program is back to ``baseline`` and serves no connection (SIGUSR1).

    Returns the last reading and the last number of live connections (-1: no answer).
    """
    pid = program.proc.pid
    deadline = time.monotonic() + timeout
    strict_until = time.monotonic()
    if SETTINGS.wait_for_idle_pool:
        strict_until += min(timeout, POOL_KEEP_IDLE + 1.0)

    def back(stats: ProcStats) -> bool:
        if time.monotonic() < strict_until:
            return stats.fds <= baseline.fds and stats.threads <= baseline.threads
        return back_to_baseline(stats, baseline)

    while True:
        stats = proc_stats(pid)
        late = time.monotonic() >= deadline
        if back(stats) or late:
            live = live_connections(program, 2.0)
            if late or (live == 0 and back(proc_stats(pid))):
                return proc_stats(pid), -1 if live is None else live
        time.sleep(0.2)


@dataclass
class Accounting:
    """Before/after readings of several programs (by label, like "local" or "server")."""

    before: dict[str, ProcStats] = field(default_factory=dict)
    after: dict[str, ProcStats] = field(default_factory=dict)
    live_after: dict[str, int] = field(default_factory=dict)

    def start(self, label: str, program: Program) -> None:
        self.start_all({label: program})

    def start_all(self, programs: dict[str, Program]) -> None:
        """Read the baselines (after the pool's idle threads are gone, if asked to wait)."""
        if SETTINGS.wait_for_idle_pool:
            time.sleep(POOL_KEEP_IDLE + 0.5)
        for label, program in programs.items():
            self.before[label] = quiet_stats(program.proc.pid)

    def finish(self, label: str, program: Program, timeout: float = 10.0) -> None:
        self.after[label], self.live_after[label] = settle(program, self.before[label], timeout)

    def problems(self) -> list[str]:
        found = []
        for label, before in self.before.items():
            after = self.after.get(label)
            if after is None:
                found.append(f"{label}: no reading after the fault")
            elif not back_to_baseline(after, before):
                found.append(
                    f"{label} did not return to its baseline: {before} -> {after} "
                    f"(up to {POOL_MAX_IDLE} idle pooled threads allowed)"
                )
            live = self.live_after.get(label, 0)
            if live < 0:
                found.append(f"{label} did not answer SIGUSR1 with its live connections")
            elif live > 0:
                found.append(f"{label} still had {live} live connection(s)")
        return found

    def column(self, what: str) -> str:
        """Like 'local 5/5, server 6/6' for what = 'fds' or 'threads'."""
        parts = []
        for label, before in self.before.items():
            after = self.after.get(label)
            shown = "?" if after is None else str(getattr(after, what))
            parts.append(f"{label} {getattr(before, what)}/{shown}")
        return ", ".join(parts)


def warm_up(local: Program, source: Source) -> None:
    """One download through ``local`` first, so lazy imports and caches are in the baseline."""
    got = download(local.port, source.port, 100_000)
    if not got.ok:
        raise AssertionError(f"warm-up download failed: {got}")


def quiet_stats(pid: int, timeout: float = 5.0) -> ProcStats:
    """The program's fds and threads once they stop changing (three equal readings)."""
    readings = [proc_stats(pid)]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.1)
        readings.append(proc_stats(pid))
        last = [(r.fds, r.threads) for r in readings[-3:]]
        if len(last) == 3 and len(set(last)) == 1:
            break
    return readings[-1]


def raise_nofile(needed: int) -> str | None:
    """Raise our soft RLIMIT_NOFILE to at least ``needed``; None if done, else why not.

    Programs started afterwards inherit the limit (fork+exec keeps rlimits), so this also
    raises it for the children, as a ``preexec_fn`` would.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            return f"RLIMIT_NOFILE hard limit is {hard}, the attack needs {needed}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return None


def kill9(launcher: Launcher, program: Program) -> None:
    """SIGKILL ``program`` and take it off the launcher's list (it cannot exit 0 now)."""
    program.proc.kill()
    program.proc.wait(10)
    program.returncode = program.proc.returncode
    with contextlib.suppress(ValueError):
        launcher.programs.remove(program)


def start_program(
    launcher: Launcher, script: str, config: dict[str, Any], port_key: str
) -> Program:
    """Start ``script`` with ``config`` as given (same port on a restart) and wait for it."""
    program = launcher.start(script, config, port_key)
    program.wait_ready()
    return program


def forget_exited(launcher: Launcher) -> None:
    """Take programs that already exited off the launcher's list (it wants exit code 0)."""
    for program in list(launcher.programs):
        if program.proc.poll() is not None:
            launcher.programs.remove(program)


class ProgramWithArgs(Program):
    """A Program started with extra arguments and its own environment (like a passphrase)."""

    def __init__(
        self,
        script: str,
        config: Path,
        port: int,
        extra_args: list[str],
        env: dict[str, str],
    ) -> None:
        self.script = script
        self.config = config
        self.port = port
        self.stderr_path = config.with_suffix(".stderr")
        self.returncode = None
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, script, "--config", str(config), "--log-level", "DEBUG"),
                    *extra_args,
                ],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )


def start_with_args(
    launcher: Launcher,
    script: str,
    config: dict[str, Any],
    port_key: str,
    extra_args: list[str],
    env: dict[str, str],
) -> ProgramWithArgs:
    path = launcher.write_config(Path(script).stem, config)
    program = ProgramWithArgs(script, path, config[port_key], extra_args, env)
    launcher.programs.append(program)
    return program


def run_to_exit(
    script: str, config: Path, extra_args: list[str], env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a program that is expected to exit on its own (a config error)."""
    return subprocess.run(
        [sys.executable, script, "--config", str(config), *extra_args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def raw_handshake(port: int, identity: RsaKey, server: ServerPublic) -> ClientHandshake | None:
    """Run the local's side of a handshake with a server; None if the server stayed silent
    and closed on us (it does so at its handshake_timeout: keep that short)."""
    handshake = ClientHandshake(identity, server)
    deadline = Deadline(IO_TIMEOUT)
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(handshake.create_client_init())
        try:
            while handshake.consume_server_response(recv_some(sock, deadline, 65536)) is None:
                pass
        except (ConnectionError, TimeoutError):
            return None
    return handshake


def sessions_opened(program: Program) -> int:
    """How many sessions the server has accepted (its "session from ... opened" lines)."""
    return len(re.findall(r"session from \S+ \([^)]*\) opened", program.stderr()))


def sessions_live(program: Program) -> int:
    """Sessions the server has open (opened and not yet "ended")."""
    ended = len(re.findall(r"session from \S+ \([^)]*\) ended", program.stderr()))
    return sessions_opened(program) - ended


def count_access(program: Program, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(1 for line in access_lines(program.stderr()) if regex.search(line))


def _logged_eventually(program: Program, pattern: str, timeout: float = 5.0) -> bool:
    return wait_for(lambda: count_access(program, pattern) > 0, timeout)


# --------------------------------------------------------------------------- a checkable stream


def pattern_at(offset: int, size: int) -> bytes:
    """``size`` bytes of the endless pattern stream from ``offset``."""
    parts = []
    while size > 0:
        start = offset % PATTERN_SIZE
        take = min(size, PATTERN_SIZE)
        parts.append(_PATTERN_TWICE[start : start + take])
        offset += take
        size -= take
    return b"".join(parts)


@dataclass
class StreamChecker:
    """Checks received bytes against the pattern stream; counts the wrong ones."""

    received: int = 0
    corrupted: int = 0

    def feed(self, data: bytes) -> None:
        expected = pattern_at(self.received, len(data))
        if data != expected:
            self.corrupted += sum(1 for a, b in zip(data, expected, strict=True) if a != b)
        self.received += len(data)


@dataclass
class SourceResult:
    """One connection to a Source: how much it sent, how and when it ended."""

    sent: int = 0
    ended: str = ""  # "done", "reset", "timeout" or "error"
    ended_at: float = 0.0


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
    return data


class Source(TCPServer):
    """A destination that sends the pattern stream: the client first sends its size (8 bytes).

    Size 0 means a stream without end; the source then sends until sending fails. Results
    are kept by the peer address (the tunnel reply's BND address).
    """

    def __init__(self, send_timeout: float = IO_TIMEOUT) -> None:
        self.results: dict[Any, SourceResult] = {}
        self._send_timeout = send_timeout
        super().__init__(self._serve, backlog=1024)

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        # A new connection may come from the port of an old one: start a fresh result.
        result = self.results[peer[:2]] = SourceResult()
        conn.settimeout(self._send_timeout)
        try:
            (size,) = SIZE_HEADER.unpack(_recv_exact(conn, SIZE_HEADER.size))
            while size == ENDLESS or result.sent < size:
                take = CHUNK if size == ENDLESS else min(CHUNK, size - result.sent)
                conn.sendall(pattern_at(result.sent, take))
                result.sent += take
            conn.shutdown(socket.SHUT_WR)
            result.ended = "done"
        except (ConnectionResetError, BrokenPipeError):
            result.ended = "reset"
        except TimeoutError:
            result.ended = "timeout"
        except (OSError, EOFError):
            result.ended = "error"
        result.ended_at = time.monotonic()

    def result_for(self, peer: tuple[str, int], timeout: float = 10.0) -> SourceResult | None:
        """The result of the connection from ``peer`` once it ended, else None."""
        if wait_for(lambda: bool(peer in self.results and self.results[peer].ended), timeout):
            return self.results[peer]
        return None


# --------------------------------------------------------------------------- downloads


@dataclass
class Download:
    """One download of the pattern stream through a local."""

    size: int
    reply: Reply | None = None
    bind: tuple[str, int] = ("", 0)
    received: int = 0
    corrupted: int = 0
    seconds: float = 0.0
    ended: str = ""  # "eof", "reset", "timeout" or "refused"

    @property
    def ok(self) -> bool:
        return self.reply == Reply.SUCCEEDED and self.ended == "eof" and self.intact

    @property
    def intact(self) -> bool:
        return self.received == self.size and self.corrupted == 0

    @property
    def bad_bytes(self) -> int:
        """Bytes lost or corrupted without the client being told (a clean EOF)."""
        missing = self.size - self.received if self.ended == "eof" else 0
        return missing + self.corrupted

    @property
    def mb_per_s(self) -> float:
        return self.received / max(self.seconds, 1e-9) / 1e6

    def __str__(self) -> str:
        return (
            f"{self.received}/{self.size} bytes, {self.corrupted} corrupted, {self.ended}, "
            f"{self.seconds:.3f}s ({self.mb_per_s:.0f} MB/s)"
        )


def download(
    local_port: int,
    source_port: int,
    size: int = DOWNLOAD_SIZE,
    host: str = "127.0.0.1",
    auth: tuple[str, str] | None = None,
) -> Download:
    """Ask the source for ``size`` bytes through the local; check every byte."""
    got = Download(size)
    started = time.monotonic()
    try:
        result = socks_request(local_port, host, source_port, auth=auth, timeout=IO_TIMEOUT)
    except (OSError, EOFError):
        got.ended = "refused"
        return got
    got.reply, got.bind = result.reply, (result.bind.host, result.bind.port)
    checker = StreamChecker()
    with result.sock as sock:
        if result.reply != Reply.SUCCEEDED:
            got.ended = "refused"
            return got
        sock.sendall(SIZE_HEADER.pack(size))
        if result.rest:
            checker.feed(result.rest)
        got.ended = _drain(sock, checker)
    got.received, got.corrupted = checker.received, checker.corrupted
    got.seconds = time.monotonic() - started
    return got


def _drain(sock: socket.socket, checker: StreamChecker, stop: threading.Event | None = None) -> str:
    try:
        while data := sock.recv(CHUNK):
            checker.feed(data)
            if stop is not None and stop.is_set():
                return "stopped"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    return "eof"


def speed(downloads: list[Download]) -> float:
    """MB/s over several downloads: all their bytes over all their time."""
    seconds = sum(d.seconds for d in downloads)
    return sum(d.received for d in downloads) / seconds / 1e6 if seconds else 0.0


def baseline_speed(local_port: int, source_port: int, runs: int = 3) -> list[Download]:
    return [download(local_port, source_port) for _ in range(runs)]


# --------------------------------------------------------------------------- slowloris


@dataclass
class Victim:
    """One slowloris connection and when the program closed it."""

    sock: socket.socket
    dribble: bytes  # what it trickles in, a byte a second (b"": silent)
    opened_at: float
    closed_at: float | None = None
    how: str = ""  # "eof" or "reset"
    received: int = 0
    sent: int = 0

    @property
    def lifetime(self) -> float | None:
        return None if self.closed_at is None else self.closed_at - self.opened_at


def random_bytes(size: int) -> bytes:
    return hashlib.shake_256(b"sockproxy dribble").digest(size)


def dribble_payloads(target: str) -> list[bytes]:
    """Message starts that never complete: what dribbling attackers trickle in."""
    if target == "local":  # a SOCKS greeting announcing 255 methods; an endless HTTP head
        return [b"\x05\xff" + b"\x00" * 255, b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nX: " + b"a" * 4000]
    # what looks like the start of a ClientInit (random bytes): it never completes
    return [random_bytes(4096)]


class Slowloris:
    """``count`` connections to ``port``: half send nothing, half dribble a byte a second.

    ``open()`` connects them all; ``start()`` watches them in a thread (one selector) and
    records when each is closed by the program; ``join()`` waits for the watcher.
    """

    def __init__(self, port: int, count: int, target: str, give_up_after: float) -> None:
        self.port = port
        self.count = count
        self.payloads = dribble_payloads(target)
        self.give_up_after = give_up_after
        self.victims: list[Victim] = []
        self.opened_in = 0.0
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def open(self) -> None:
        started = time.monotonic()
        for index in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
            payload = self.payloads[index // 2 % len(self.payloads)] if index % 2 else b""
            victim = Victim(sock, dribble=payload, opened_at=time.monotonic())
            self.victims.append(victim)
            if victim.dribble:
                self._send_one(victim)
        self.opened_in = time.monotonic() - started

    def _send_one(self, victim: Victim) -> None:
        at = victim.sent % len(victim.dribble)
        byte = victim.dribble[at : at + 1]
        try:
            victim.sock.send(byte)
            victim.sent += 1
        except OSError:
            self._closed(victim, "reset")

    def _closed(self, victim: Victim, how: str) -> None:
        if victim.closed_at is None:
            victim.closed_at = time.monotonic()
            victim.how = how

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(self.give_up_after + 30)

    def _watch(self) -> None:
        selector = selectors.DefaultSelector()
        for each in self.victims:
            each.sock.setblocking(False)
            selector.register(each.sock, selectors.EVENT_READ, each)
        end = time.monotonic() + self.give_up_after
        next_dribble = time.monotonic() + 1.0
        open_count = sum(1 for v in self.victims if v.closed_at is None)
        try:
            while open_count and time.monotonic() < end:
                for key, _ in selector.select(timeout=0.05):
                    victim: Victim = key.data
                    try:
                        data = victim.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data, how = b"", "reset"
                    else:
                        how = "eof"
                    if data:
                        victim.received += len(data)  # never: the programs stay silent
                        continue
                    self._closed(victim, how)
                    selector.unregister(victim.sock)
                    open_count -= 1
                if time.monotonic() >= next_dribble:
                    next_dribble += 1.0
                    for each in self.victims:
                        if each.dribble and each.closed_at is None:
                            self._send_one(each)
        finally:
            selector.close()
            for each in self.victims:
                each.sock.close()

    def still_open(self) -> int:
        return sum(1 for v in self.victims if v.closed_at is None)


@dataclass
class SlowlorisReport:
    target: str
    count: int
    handshake_timeout: float
    slack: float
    victims: list[Victim]
    opened_in: float
    baseline: list[Download]
    during: list[Download]
    accounting: Accounting

    @property
    def lifetimes(self) -> list[float]:
        return [v.lifetime for v in self.victims if v.lifetime is not None]

    @property
    def closed_in_window(self) -> int:
        low, high = self.handshake_timeout - 0.05, self.handshake_timeout + self.slack
        return sum(1 for t in self.lifetimes if low <= t <= high)

    @property
    def baseline_speed(self) -> float:
        return speed(self.baseline)

    @property
    def attack_speed(self) -> float:
        return speed(self.during)

    @property
    def bad_bytes(self) -> int:
        return sum(d.bad_bytes for d in self.baseline + self.during)

    def problems(self) -> list[str]:
        found = []
        if self.closed_in_window != self.count:
            early = [t for t in self.lifetimes if t < self.handshake_timeout - 0.05]
            found.append(
                f"{self.closed_in_window}/{self.count} closed {self.handshake_timeout}"
                f"..{self.handshake_timeout + self.slack}s after opening; "
                f"{len(self.victims) - len(self.lifetimes)} never closed, {len(early)} early, "
                f"max {max(self.lifetimes, default=0):.2f}s"
            )
        wrong = [d for d in self.baseline + self.during if not d.ok]
        if wrong:
            found.append(f"downloads failed: {'; '.join(map(str, wrong))}")
        if not self.during:
            found.append("no download finished while the attack connections were open")
        elif self.attack_speed < self.baseline_speed / 5:
            found.append(
                f"download during the attack at {self.attack_speed:.0f} MB/s, "
                f"under 1/5 of {self.baseline_speed:.0f} MB/s before"
            )
        return found + self.accounting.problems()

    def outcome(self) -> str:
        closes = self.lifetimes
        return (
            f"{self.closed_in_window}/{self.count} closed after the {self.handshake_timeout:g}s "
            f"timeout (min {min(closes, default=0):.2f}s, max {max(closes, default=0):.2f}s); "
            f"{len(self.during)} x 5 MB downloads during it at {self.attack_speed:.0f} MB/s "
            f"(before: {self.baseline_speed:.0f} MB/s)"
        )


def slowloris_scenario(
    launcher: Launcher,
    source: Source,
    target: str,
    count: int,
    handshake_timeout: float = 2.0,
    slack: float = 2.0,
) -> SlowlorisReport:
    """``count`` silent/dribbling connections to one program while a client downloads."""
    limits = {"handshake_timeout": handshake_timeout, "max_connections": max(2000, 2 * count)}
    server, local = launcher.pair(server=limits, local=limits)
    victim_program = local if target == "local" else server
    accounting = Accounting()
    warm_up(local, source)
    accounting.start_all({"local": local, "server": server})
    baseline = baseline_speed(local.port, source.port)
    attack = Slowloris(victim_program.port, count, target, give_up_after=30.0)
    attack.open()
    attack.start()
    # The attack is in place once the program serves every attack connection: a thread for
    # each (both programs stay silent until a first message completes).
    wanted = count + 2  # and the main and accept threads
    wait_for(lambda: proc_stats(victim_program.proc.pid).threads >= wanted, 1.0, step=0.05)
    during: list[Download] = []
    # Download again and again while every attack connection is still open.
    while attack.still_open() == count and len(during) < 10:
        during.append(download(local.port, source.port))
    attack.join()
    for label, program in (("local", local), ("server", server)):
        accounting.finish(label, program)
    report = SlowlorisReport(
        target,
        count,
        handshake_timeout,
        slack,
        attack.victims,
        attack.opened_in,
        baseline,
        during,
        accounting,
    )
    return report


# --------------------------------------------------------------------------- max_connections


class Echo(TCPServer):
    """Echoes until EOF; holds idle connections open as long as their clients do."""

    def __init__(self) -> None:
        super().__init__(self._echo, backlog=1024)

    @staticmethod
    def _echo(conn: socket.socket, _peer: Any) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


def refused_at_once(port: int, greeting: bytes) -> tuple[bool, float]:
    """Connect, send ``greeting``, read: (closed without one byte of answer, seconds taken)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        try:
            if greeting:
                sock.sendall(greeting)
            answer = sock.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
        except TimeoutError:
            return False, time.monotonic() - started
    return answer == b"", time.monotonic() - started


@dataclass
class FloodReport:
    target: str
    limit: int
    held: int  # tunnels that got a slot and answered an echo
    attempts: int
    refusals: list[tuple[bool, float]]
    tunnel_refused: bool  # a SOCKS request through the local failed cleanly while full
    logged: bool  # the program logged "max_connections (N) reached"
    rss_before_kb: int
    rss_after_kb: int
    works_after: Download
    accounting: Accounting
    rss_bound_kb: int = 16 * 1024

    @property
    def refused(self) -> int:
        return sum(1 for ok, _ in self.refusals if ok)

    @property
    def slowest_refusal(self) -> float:
        return max((t for _, t in self.refusals), default=0.0)

    def problems(self) -> list[str]:
        found = []
        if self.held != self.limit:
            found.append(f"only {self.held}/{self.limit} holding connections worked")
        if self.refused != self.attempts or self.slowest_refusal > 1.0:
            found.append(
                f"{self.refused}/{self.attempts} refused without an answer, "
                f"slowest after {self.slowest_refusal:.2f}s"
            )
        if not self.tunnel_refused:
            found.append("a request through the full program did not fail cleanly")
        if not self.logged:
            found.append(f"no 'max_connections ({self.limit}) reached' in the log")
        if self.rss_after_kb - self.rss_before_kb > self.rss_bound_kb:
            found.append(f"RSS grew from {self.rss_before_kb} to {self.rss_after_kb} kB")
        if not self.works_after.ok:
            found.append(f"download after the flood failed: {self.works_after}")
        return found + self.accounting.problems()

    def outcome(self) -> str:
        return (
            f"{self.held} held, {self.refused}/{self.attempts} refused at once "
            f"(slowest {self.slowest_refusal * 1000:.0f} ms); RSS {self.rss_before_kb // 1024}"
            f"->{self.rss_after_kb // 1024} MB; "
            f"download after: {'ok' if self.works_after.ok else 'FAILED'}"
        )


def flood_scenario(
    launcher: Launcher, source: Source, target: str, limit: int = 20, attempts: int = 200
) -> FloodReport:
    """Fill ``max_connections`` of one program with idle tunnels, then knock ``attempts`` times."""
    # A short handshake_timeout: a connection that never completes a first message (like
    # the readiness check of the launcher) holds a server slot until then.
    limited = {"max_connections": limit, "handshake_timeout": 1}
    roomy = {"max_connections": 4 * limit + 64, "handshake_timeout": 1}
    # One session per client connection, so that the idle tunnels fill the server's
    # connection slots too (on one session they would take only its stream slots).
    server, local = launcher.pair(
        server=limited if target == "server" else roomy,
        local={**(limited if target == "local" else roomy), "resumption_lifetime": 0},
    )
    full = local if target == "local" else server
    accounting = Accounting()
    echo = Echo()
    holders: list[socket.socket] = []
    try:
        warm_up(local, source)
        time.sleep(1.0)  # the readiness check's slot is free again
        wait_for(lambda: sessions_live(server) == 0, 5)  # and the warm-up session's
        accounting.start_all({"local": local, "server": server})
        held = 0
        for _ in range(limit):
            result = socks_request(local.port, "127.0.0.1", echo.port, timeout=IO_TIMEOUT)
            holders.append(result.sock)
            if result.reply == Reply.SUCCEEDED:
                result.sock.sendall(b"hi")
                held += result.sock.recv(2) == b"hi"
        rss_before = proc_stats(full.proc.pid).rss_kb
        greeting = build_greeting(b"\x00") if target == "local" else b""
        refusals = [refused_at_once(full.port, greeting) for _ in range(attempts)]
        tunnel_refused = _tunnel_refused(local.port, echo.port)
        rss_after = proc_stats(full.proc.pid).rss_kb
        logged = f"max_connections ({limit}) reached" in full.stderr()
    finally:
        for sock in holders:
            sock.close()
        echo_close = echo.close
    for label, program in (("local", local), ("server", server)):
        accounting.finish(label, program)
    works_after = download(local.port, source.port)
    echo_close()
    report = FloodReport(
        target,
        limit,
        held,
        attempts,
        refusals,
        tunnel_refused,
        logged,
        rss_before,
        rss_after,
        works_after,
        accounting,
    )
    return report


def _tunnel_refused(local_port: int, dport: int) -> bool:
    """A SOCKS request now fails: refused by the local, or a failure reply from it."""
    started = time.monotonic()
    try:
        result = socks_request(local_port, "127.0.0.1", dport, timeout=IO_TIMEOUT)
    except (ConnectionResetError, BrokenPipeError, EOFError):
        return time.monotonic() - started < 2.0
    with result.sock:
        return result.reply == Reply.GENERAL_FAILURE and time.monotonic() - started < 5.0


# --------------------------------------------------------------------------- kill -9


class EndlessDownload:
    """A download of the endless stream in a thread; it ends only when something breaks."""

    def __init__(self, local_port: int, source_port: int) -> None:
        result = socks_request(local_port, "127.0.0.1", source_port, timeout=IO_TIMEOUT)
        if result.reply != Reply.SUCCEEDED:
            result.sock.close()
            raise AssertionError(f"endless download refused: {result.reply!r}")
        self.sock = result.sock
        self.bind = (result.bind.host, result.bind.port)
        self.checker = StreamChecker()
        if result.rest:
            self.checker.feed(result.rest)
        self.ended = ""
        self.ended_at = 0.0
        self.client_port: int = self.sock.getsockname()[1]
        self.sock.sendall(SIZE_HEADER.pack(ENDLESS))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.sock:
            self.ended = _drain(self.sock, self.checker, self._stop)
        self.ended_at = time.monotonic()

    def stop(self) -> None:
        """End it from our side (the client closes)."""
        self._stop.set()
        self._thread.join(IO_TIMEOUT)

    def wait_received(self, size: int, timeout: float = 10.0) -> bool:
        return wait_for(lambda: self.checker.received >= size or bool(self.ended), timeout)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class KillReport:
    """One kill -9 (or stuck peer) fault and what everyone saw."""

    fault: str
    received: int = 0
    corrupted: int = 0
    lost: int = 0  # bytes the client was told were complete but never got
    ended: str = ""  # how the client's connection ended ("reset", "eof", ...)
    detect_seconds: float = 0.0  # from the fault to the end the client (or destination) saw
    detect_limit: float = 2.0
    accepted_endings: tuple[str, ...] = ("reset",)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    accounting: Accounting = field(default_factory=Accounting)

    @property
    def bad_bytes(self) -> int:
        return self.corrupted + self.lost

    def problems(self) -> list[str]:
        found = list(self.failures)
        if self.ended not in self.accepted_endings:
            found.append(f"the connection ended with {self.ended or 'nothing'}")
        if self.detect_seconds > self.detect_limit:
            found.append(
                f"the close took {self.detect_seconds:.2f}s (limit {self.detect_limit:g}s)"
            )
        if self.bad_bytes:
            found.append(f"{self.corrupted} corrupted and {self.lost} lost bytes")
        return found + self.accounting.problems()

    def outcome(self) -> str:
        text = f"{self.ended} after {self.detect_seconds:.2f}s, {self.received >> 20} MiB ok"
        return "; ".join([text, *self.notes])


def kill_server_scenario(launcher: Launcher, source: Source) -> KillReport:
    """kill -9 the server under two live streams of one session; restart it on the same
    port; the local notices the dead session and carries on with a fresh one."""
    report = KillReport("kill -9 server", detect_limit=2.0)
    config = launcher.server_config()
    server = start_program(launcher, "server.py", config, "server_port")
    local = launcher.local(server.port)
    warm_up(local, source)  # also leaves the local a live session
    report.accounting.start("local", local)
    transfers = [EndlessDownload(local.port, source.port) for _ in range(2)]
    for transfer in transfers:
        transfer.wait_received(4 << 20)
    if sessions_opened(server) != 1:
        report.failures.append(f"{sessions_opened(server)} sessions for three connections, not 1")
    killed_at = time.monotonic()
    kill9(launcher, server)
    for transfer in transfers:
        transfer.join(10)
    endings = {transfer.ended for transfer in transfers}
    report.ended = endings.pop() if len(endings) == 1 else "/".join(sorted(endings))
    report.received = sum(t.checker.received for t in transfers)
    report.corrupted = sum(t.checker.corrupted for t in transfers)
    report.detect_seconds = max(t.ended_at or time.monotonic() for t in transfers) - killed_at
    report.notes.append(f"{len(transfers)} streams of one session")
    report.accounting.finish("local", local)
    try:
        restarted = start_program(launcher, "server.py", config, "server_port")
    except (OSError, AssertionError, pytest.fail.Exception) as exc:
        report.failures.append(f"restart on the same port failed: {exc}")
        forget_exited(launcher)
        return report
    after = download(local.port, source.port)
    if not after.ok:
        report.failures.append(f"download after the restart failed: {after}")
    opened = sessions_opened(restarted)
    if opened != 1:
        report.failures.append(f"after the restart: {opened} sessions opened, not 1")
    report.notes.append("restarted on the same port; a fresh session took over")
    report.accounting.start("server", restarted)
    again = download(local.port, source.port)
    if not again.ok:
        report.failures.append(f"second download after the restart failed: {again}")
    report.accounting.finish("server", restarted)
    return report


class SourceProcess:
    """A destination in its own process (``python -m tests.faults_support source``).

    It sends the endless pattern stream to each connection and prints ``sent N`` after
    every chunk it handed to the kernel, so we know a lower bound of what it sent.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults_support", "source"],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self._out = self.proc.stdout
        first = self._out.readline().split()
        if first[:1] != ["port"]:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"source process did not start: {first}")
        self.port = int(first[1])
        self.sent = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._out:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "sent" and parts[1].isdigit():
                self.sent = max(self.sent, int(parts[1]))  # a line cut by the kill: ignored

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._thread.join(5)
        self._out.close()


def kill_destination_scenario(launcher: Launcher, source: Source) -> KillReport:
    """kill -9 the destination process mid-download: the client sees the close at once."""
    report = KillReport("kill -9 destination", detect_limit=2.0, accepted_endings=("eof", "reset"))
    server, local = launcher.pair()
    warm_up(local, source)
    report.accounting.start_all({"local": local, "server": server})
    destination = SourceProcess()
    try:
        transfer = EndlessDownload(local.port, destination.port)
        transfer.wait_received(4 << 20)
        killed_at = time.monotonic()
        destination.kill()
    except BaseException:
        destination.kill()
        raise
    transfer.join(10)
    report.ended = transfer.ended
    report.received, report.corrupted = transfer.checker.received, transfer.checker.corrupted
    report.detect_seconds = (transfer.ended_at or time.monotonic()) - killed_at
    if report.ended == "eof":  # a clean end must have brought everything the kernel had
        report.lost = max(0, destination.sent - report.received)
    report.notes.append(f"destination had sent >= {destination.sent >> 20} MiB")
    for label, program in (("local", local), ("server", server)):
        report.accounting.finish(label, program)
    return report


def kill_client_scenario(launcher: Launcher, source: Source) -> KillReport:
    """kill -9 a client process mid-download: the server tears down its destination side."""
    report = KillReport(
        "kill -9 client", detect_limit=5.0, accepted_endings=("reset", "error", "done")
    )
    server, local = launcher.pair()
    warm_up(local, source)
    report.accounting.start_all({"local": local, "server": server})
    client = subprocess.Popen(
        [sys.executable, "-m", "tests.faults_support", "client", str(local.port), str(source.port)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert client.stdout is not None
    try:
        words = client.stdout.readline().split()  # "bind HOST PORT"
        bind = (words[1], int(words[2])) if words[:1] == ["bind"] else ("", 0)
        while (line := client.stdout.readline()) and int(line.split()[1]) < (4 << 20):
            pass
        report.received = int(line.split()[1]) if line else 0
        killed_at = time.monotonic()
    finally:
        client.kill()
        client.wait(10)
        client.stdout.close()
    result = source.result_for(bind, timeout=report.detect_limit + 5)
    if result is None:
        report.ended = "still sending"
        report.detect_seconds = time.monotonic() - killed_at
    else:
        report.ended = result.ended
        report.detect_seconds = result.ended_at - killed_at
    report.notes.append("the destination saw its connection torn down")
    for label, program in (("local", local), ("server", server)):
        report.accounting.finish(label, program)
    return report


# --------------------------------------------------------------------------- stuck destination


class Pusher:
    """Pushes data through the local into a destination, until sending fails."""

    def __init__(self, local_port: int, dport: int) -> None:
        result = socks_request(local_port, "127.0.0.1", dport, timeout=IO_TIMEOUT)
        if result.reply != Reply.SUCCEEDED:
            result.sock.close()
            raise AssertionError(f"push refused: {result.reply!r}")
        self.sock = result.sock
        self.bind = (result.bind.host, result.bind.port)
        self.pushed = 0
        self.last_progress = time.monotonic()
        self.ended = ""
        self.ended_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        chunk = pattern_at(0, 64 * 1024)
        with self.sock:
            try:
                while True:
                    self.sock.sendall(chunk)
                    self.pushed += len(chunk)
                    self.last_progress = time.monotonic()
            except (ConnectionResetError, BrokenPipeError):
                self.ended = "reset"
            except TimeoutError:
                self.ended = "timeout"
            except OSError as exc:
                self.ended = f"error {exc.errno}"
        self.ended_at = time.monotonic()

    def stuck_for(self) -> float:
        return time.monotonic() - self.last_progress

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class StuckReport(KillReport):
    baseline: list[Download] = field(default_factory=list)
    during: list[Download] = field(default_factory=list)
    idle_timeout: float = 3.0

    @property
    def bad_bytes(self) -> int:
        return sum(d.bad_bytes for d in self.baseline + self.during)

    def problems(self) -> list[str]:
        found = super().problems()
        wrong = [d for d in self.baseline + self.during if not d.ok]
        if wrong:
            found.append(f"downloads failed: {'; '.join(map(str, wrong))}")
        if not self.during or speed(self.during) < speed(self.baseline) / 5:
            found.append(
                f"downloads next to the stuck one at {speed(self.during):.0f} MB/s, "
                f"before {speed(self.baseline):.0f} MB/s"
            )
        return found

    def outcome(self) -> str:
        return (
            f"stuck after {self.received >> 10} KiB pushed; closed ({self.ended}) "
            f"{self.detect_seconds:.1f}s after it stalled (idle_timeout {self.idle_timeout:g}s); "
            f"{len(self.during)} x 5 MB downloads meanwhile at {speed(self.during):.0f} MB/s "
            f"(before: {speed(self.baseline):.0f} MB/s); " + "; ".join(self.notes)
        )


def stuck_destination_scenario(
    launcher: Launcher, source: Source, idle_timeout: float = 3.0
) -> StuckReport:
    """A destination that never reads: others are not slowed; idle_timeout ends it."""
    report = StuckReport(
        "stuck destination",
        idle_timeout=idle_timeout,
        detect_limit=idle_timeout + 4.0,
        accepted_endings=("reset",),
    )
    timeouts = {"idle_timeout": idle_timeout}
    server, local = launcher.pair(server=timeouts, local=timeouts)
    release = threading.Event()
    stuck = TCPServer(lambda _conn, _peer: release.wait(60))
    try:
        warm_up(local, source)
        report.accounting.start_all({"local": local, "server": server})
        report.baseline = baseline_speed(local.port, source.port)
        pusher = Pusher(local.port, stuck.port)
        wait_for(lambda: pusher.pushed > 0 and pusher.stuck_for() > 0.3, 10)
        while not pusher.ended and len(report.during) < 5:
            report.during.append(download(local.port, source.port))
        pusher.join(idle_timeout + 15)
        report.ended, report.received = pusher.ended, pusher.pushed
        report.detect_seconds = (pusher.ended_at or time.monotonic()) - pusher.last_progress
        target = f"-> 127.0.0.1:{stuck.port} "
        for label, program in (("server", server), ("local", local)):
            ok = _logged_eventually(program, target + r".*outcome=aborted")
            lines = [x for x in access_lines(program.stderr()) if target in x]
            outcome = lines[-1].rsplit("outcome=", 1)[-1] if lines else "no access line"
            report.notes.append(f"{label}: {outcome}")
            if not ok:
                report.failures.append(f"{label} did not log an aborted stuck connection")
    finally:
        release.set()
        stuck.close()
    for label, program in (("local", local), ("server", server)):
        report.accounting.finish(label, program)
    return report


# --------------------------------------------------------------------------- a wiretap


class Wiretap(TCPServer):
    """A passive man in the middle: forwards both ways untouched and keeps what it saw.

    ``links`` holds, per connection, (local -> server bytes, server -> local bytes).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.links: list[tuple[bytearray, bytearray]] = []
        super().__init__(self._tap)

    def _tap(self, conn: socket.socket, _peer: Any) -> None:
        link = (bytearray(), bytearray())
        self.links.append(link)
        with socket.create_connection(("127.0.0.1", self.upstream_port), IO_TIMEOUT) as up:
            back = threading.Thread(target=_pipe, args=(up, conn, link[1]), daemon=True)
            back.start()
            _pipe(conn, up, link[0])
            back.join(3 * IO_TIMEOUT)


def _pipe(source: socket.socket, sink: socket.socket, seen: bytearray) -> None:
    try:
        while data := source.recv(65536):
            seen += data
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # a reset ends the copy; the programs see it for themselves


# --------------------------------------------------------------------------- failover


@dataclass
class FailoverReport:
    steps: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    downloads: list[Download] = field(default_factory=list)

    def problems(self) -> list[str]:
        wrong = [str(d) for d in self.downloads if not d.ok]
        return self.failures + ([f"downloads failed: {'; '.join(wrong)}"] if wrong else [])

    def outcome(self) -> str:
        return "; ".join(self.steps)


def failover_scenario(launcher: Launcher, source: Source) -> FailoverReport:
    """A local with two servers: the first dies, the second serves; the first comes back."""
    report = FailoverReport()
    first_config, second_config = launcher.server_config(), launcher.server_config()
    first = launcher.start("server.py", first_config, "server_port")
    second = launcher.start("server.py", second_config, "server_port")
    public = launcher.keys.path("server_public")
    endpoints = [
        {"server_address": "127.0.0.1", "server_port": port, "server_public_key": public}
        for port in (first.port, second.port)
    ]
    # One session per download: each one chooses its server afresh (a live session would
    # keep carrying new connections to the second server after the first came back).
    config = launcher.local_config(first.port, servers=endpoints, resumption_lifetime=0)
    for single in ("server_address", "server_port", "server_public_key"):
        del config[single]
    local = launcher.start("local.py", config, "local_port")
    for program in (first, second, local):
        program.wait_ready()
    via = f"-> 127.0.0.1:{source.port} "
    failed = f"server 127.0.0.1:{first.port} failed"

    def fetch(step: str, server: Program, count: int) -> None:
        got = download(local.port, source.port)
        report.downloads.append(got)
        served = wait_for(lambda: count_access(server, via) >= count, 5)
        report.steps.append(f"{step}: {'ok' if got.ok else 'FAILED'} via {server.port}")
        if not served:
            report.failures.append(f"{step}: the download did not go through {server.port}")

    fetch("both up", first, 1)
    kill9(launcher, first)
    failed_at = time.monotonic()
    fetch("first killed", second, 1)
    fetch("first in back-off", second, 2)
    attempts = local.stderr().count(failed)
    if attempts != 1:
        report.failures.append(f"the local tried the dead server {attempts} times, not once")
    restarted = start_program(launcher, "server.py", first_config, "server_port")
    time.sleep(max(0.0, failed_at + 1.2 - time.monotonic()))  # the first back-off is 1 s
    fetch("first restarted, back-off over", restarted, 1)
    second_total = count_access(second, via)
    if second_total != 2:
        report.failures.append(f"the second server served {second_total} downloads, not 2")
    return report


# --------------------------------------------------------------------------- helper processes


def _source_process() -> None:
    """``source``: serve the endless pattern stream; print the port, then ``sent N``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(60)
    print("port", listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.settimeout(60)
    _recv_exact(conn, SIZE_HEADER.size)
    sent = 0
    while True:
        conn.sendall(pattern_at(sent, CHUNK))
        sent += CHUNK
        print("sent", sent, flush=True)


def _client_process(local_port: int, source_port: int) -> None:
    """``client``: download the endless stream; print ``bind H P``, then ``received N``."""
    result = socks_request(local_port, "127.0.0.1", source_port, timeout=60)
    print("bind", result.bind.host, result.bind.port, flush=True)
    result.sock.sendall(SIZE_HEADER.pack(ENDLESS))
    received = len(result.rest)
    next_report = 0
    while data := result.sock.recv(CHUNK):
        received += len(data)
        if received >= next_report:
            print("received", received, flush=True)
            next_report = received + (1 << 20)


def main(argv: list[str]) -> int:
    if argv[:1] == ["source"]:
        _source_process()
    elif argv[:1] == ["client"] and len(argv) == 3:
        _client_process(int(argv[1]), int(argv[2]))
    else:
        print("usage: python -m tests.faults_support source | client LOCAL_PORT SOURCE_PORT")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
