#!/usr/bin/env python3
"""What an idle local costs the server: memory, threads, CPU and keepalive bytes.

    .venv/bin/python bench/idle.py                 # 50 idle locals, 60 s idle (~2.3 min here)
    .venv/bin/python bench/idle.py --locals 20 --idle 300

The programs run under this interpreter (it needs the project's requirements). Each local.py
takes ~49 MB of RSS, so the default run needs ~2.5 GB.

Protocol v2 keeps one session per local.py (one TCP connection to server.py, authenticated
and keyed once); a local pings a session silent for KEEPALIVE_INTERVAL (client/tunnel.py)
and the server answers with a PONG. This script starts one real server.py (fresh keys from
utils/genkey.py, 127.0.0.1, free ports) and measures it from /proc (VmRSS and Threads from
status, utime + stime from stat, open fds):

1. alone, over --baseline seconds (its own CPU rate, subtracted later);
2. with one local (the first session also pays the server's one-time costs);
3. with --locals locals, each of which has made one SOCKS5 connection to a tiny loopback
   destination (bench/fetcher.py) so that its session exists, then left idle: after
   --settle seconds, every 10 s over --idle seconds.

Per idle local: RSS (delta over the server alone / N, and the marginal figure over the
one-local state), threads, fds, server CPU per hour (the idle period's CPU delta minus the
server's own rate, extrapolated; /proc counts CPU in 10 ms ticks, the table shows what
that means per local) and keepalive bytes per minute each way. The bytes come
from the code (one PING record sealed by utils/cells.py, the PONG is the same size) and are
checked on the wire: the first local dials the server through a counting relay
(bench/delayrelay.py with no delay) that records the size and time of every chunk. The
locals' own CPU and RSS are shown too. Every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.delayrelay import DOWN, UP, DelayRelay, LinkEvent
from bench.fetcher import Destination, Target, run_fetches
from bench.peers import (
    SockproxyOptions,
    generate_keys,
    start_sockproxy_local,
    start_sockproxy_server,
)
from bench.procs import PeerError, Proc, Processes, git_revision, interrupt_on, log, remove_tmp
from client.tunnel import KEEPALIVE_INTERVAL
from server.handler import SESSION_TIMEOUT
from utils.cells import RecordSealer
from utils.mux import PING_SIZE, ping_frame

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
KEEPALIVE_TICK = 1.0  # Connector._keepalive_loop looks at its sessions once a second
SAMPLE_EVERY = 10.0  # seconds between looks at the server during the idle period
SERVER_SETTLE = 2.0  # after it listens, before its own CPU rate is measured
ONE_LOCAL_SETTLE = 3.0  # the worker pool lets a parked thread go after 2 s
STARTERS = 6  # locals started at once (each spends ~1 s importing, the machine has 2 cores)
TCP_ESTABLISHED = "01"  # the state column of /proc/net/tcp


# ------------------------------------------------------------------------------ /proc


@dataclass(frozen=True)
class Usage:
    """One look at a process in /proc."""

    at: float  # time.monotonic()
    rss_kb: int
    threads: int
    fds: int
    cpu_s: float  # utime + stime


def usage(pid: int) -> Usage:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {name: value for name, _, value in (line.partition(":") for line in status)}
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_ticks = int(stat[11]) + int(stat[12])  # fields 14 and 15, counted after the name
    return Usage(
        at=time.monotonic(),
        rss_kb=int(fields["VmRSS"].split()[0]),
        threads=int(fields["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpu_s=cpu_ticks / CLOCK_TICKS,
    )


def sessions_open(server_port: int) -> int:
    """Established TCP connections whose local end is the server's port (IPv4 loopback)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].rsplit(":", 1)[1], 16)
        if port == server_port and fields[3] == TCP_ESTABLISHED:
            count += 1
    return count


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------ the wire


def keepalive_record_size() -> int:
    """Bytes of one PING record as the code seals it (a PONG has the same layout)."""
    return len(RecordSealer(bytes(32)).seal(ping_frame(bytes(PING_SIZE))))


class WireCounter:
    """A DelayRelay observer: the time and size of every chunk, up (local -> server) or down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: list[tuple[float, str, int]] = []

    def __call__(self, event: LinkEvent) -> None:
        if event.kind in (UP, DOWN) and event.size > 0:
            with self._lock:
                self._chunks.append((time.monotonic(), event.kind, event.size))

    def between(self, start: float, end: float, kind: str) -> list[tuple[float, int]]:
        with self._lock:
            return [(t, size) for t, k, size in self._chunks if k == kind and start <= t < end]


# ------------------------------------------------------------------------------ the run


@dataclass
class Run:
    """What one run started and saw."""

    args: argparse.Namespace
    procs: Processes
    tmp: Path
    destination: Destination
    counter: WireCounter = field(default_factory=WireCounter)
    server: Proc | None = None
    server_port: int = 0
    locals: list[Proc] = field(default_factory=list)
    alone: tuple[Usage, Usage] | None = None  # start and end of the baseline period
    one: Usage | None = None
    idle: list[Usage] = field(default_factory=list)  # every SAMPLE_EVERY s
    locals_cpu: tuple[float, float] = (0.0, 0.0)  # sum over the locals, idle start and end
    locals_rss_kb: list[int] = field(default_factory=list)
    sessions: list[int] = field(default_factory=list)  # open: alone, 1 local, idle start, end
    loads: dict[str, str] = field(default_factory=dict)
    server_exit: int | None = None

    @property
    def server_pid(self) -> int:
        assert self.server is not None
        return self.server.pid


OPTIONS = SockproxyOptions(log_level="WARNING")


def start_server(run: Run) -> None:
    generate_keys(run.tmp / "keys", run.args.bits)
    run.server, run.server_port = start_sockproxy_server(run.procs, run.tmp, OPTIONS)


def start_local(run: Run, number: int, server_port: int) -> int:
    """local.py number ``number`` in its own folder (config, log), sharing the keys; its port."""
    folder = run.tmp / f"local-{number}"
    folder.mkdir()
    (folder / "keys").symlink_to(run.tmp / "keys", target_is_directory=True)
    local, port = start_sockproxy_local(run.procs, folder, server_port, OPTIONS)
    run.locals.append(local)
    return port


def open_session(run: Run, number: int, socks_port: int) -> None:
    """One SOCKS5 connection through the local, checked byte for byte: its session opens."""
    target = Target(socks_port, run.destination.port)
    result = run_fetches(run.destination, target, 1, 1)[0]
    if result.error is not None:
        raise PeerError(f"local {number}: its first connection failed: {result.error}")


def measure_alone(run: Run) -> None:
    time.sleep(SERVER_SETTLE)
    start = usage(run.server_pid)
    time.sleep(run.args.baseline)
    run.alone = (start, usage(run.server_pid))
    run.sessions.append(sessions_open(run.server_port))


def measure_one(run: Run, relay_port: int) -> None:
    """The first local dials through the counting relay; the server with its one session."""
    open_session(run, 0, start_local(run, 0, relay_port))
    time.sleep(ONE_LOCAL_SETTLE)
    run.one = usage(run.server_pid)
    run.sessions.append(sessions_open(run.server_port))


def add_idle_locals(run: Run, first: int, count: int) -> None:
    """Start them STARTERS at a time, then open their sessions one after the other (the
    destination runs inside each run_fetches call, so those cannot overlap)."""
    numbers = range(first, first + count)
    with ThreadPoolExecutor(STARTERS) as pool:
        ports = list(pool.map(lambda n: start_local(run, n, run.server_port), numbers))
    for number, port in zip(numbers, ports, strict=True):
        open_session(run, number, port)
    log(f"{len(run.locals)} locals, each with a session; {sessions_open(run.server_port)} open")


def measure_idle(run: Run) -> None:
    time.sleep(run.args.settle)
    run.loads["idle start"] = load()
    run.sessions.append(sessions_open(run.server_port))
    locals_start = sum(usage(local.pid).cpu_s for local in run.locals)
    run.idle.append(usage(run.server_pid))
    end = run.idle[0].at + run.args.idle
    while (now := time.monotonic()) < end - 0.01:
        time.sleep(min(SAMPLE_EVERY, end - now))
        run.idle.append(usage(run.server_pid))
    local_usages = [usage(local.pid) for local in run.locals]
    run.locals_cpu = (locals_start, sum(u.cpu_s for u in local_usages))
    run.locals_rss_kb = [u.rss_kb for u in local_usages]
    run.sessions.append(sessions_open(run.server_port))
    run.loads["idle end"] = load()


def measure(run: Run) -> None:
    start_server(run)
    log(f"server alone for {run.args.baseline:g} s")
    measure_alone(run)
    with DelayRelay(("127.0.0.1", run.server_port), 0.0, observer=run.counter) as relay:
        measure_one(run, relay.port)
        add_idle_locals(run, 1, run.args.locals - 1)
        log(f"settle {run.args.settle:g} s, then idle for {run.args.idle:g} s")
        measure_idle(run)
        stop_locals(run)


def stop_locals(run: Run) -> None:
    """SIGTERM to every local at once (by PID), then wait for each."""
    for local in run.locals:
        if local.popen.poll() is None:
            local.popen.send_signal(signal.SIGTERM)
    for local in run.locals:
        run.procs.stop(local)


def stop_everything(run: Run) -> None:
    stop_locals(run)
    if run.server is not None and run.server.popen.returncode is None:
        run.server_exit = run.procs.stop(run.server).exit_code
    run.procs.stop_all()


# ------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Wire:
    """The counted local's keepalive during the idle period, on the relay."""

    seconds: float
    up: list[tuple[float, int]]  # (time, size) of each chunk
    down: list[tuple[float, int]]

    @property
    def interval(self) -> float | None:
        if len(self.up) < 2:
            return None
        return (self.up[-1][0] - self.up[0][0]) / (len(self.up) - 1)


def wire(run: Run) -> Wire:
    start, end = run.idle[0].at, run.idle[-1].at
    up, down = (run.counter.between(start, end, kind) for kind in (UP, DOWN))
    return Wire(end - start, up, down)


def ping_interval(run: Run) -> float:
    """Seconds between PINGs: as counted on the relay, else the middle of the expected range."""
    return wire(run).interval or KEEPALIVE_INTERVAL + KEEPALIVE_TICK / 2


def per_minute(record: int, interval: float) -> float:
    return record * 60 / interval


def server_cpu_ms_per_hour(run: Run) -> tuple[float, float, float]:
    """Per idle local; also the idle period's server CPU (ms) and the server's own share."""
    assert run.alone is not None
    before, after = run.alone
    own_rate = (after.cpu_s - before.cpu_s) / (after.at - before.at)
    seconds = run.idle[-1].at - run.idle[0].at
    spent = run.idle[-1].cpu_s - run.idle[0].cpu_s
    own = own_rate * seconds
    each = (spent - own) / len(run.locals) * 3600 / seconds
    return each * 1000, spent * 1000, own * 1000


def cpu_resolution_ms_per_hour(run: Run) -> float:
    seconds = run.idle[-1].at - run.idle[0].at
    return 1000 / CLOCK_TICKS / len(run.locals) * 3600 / seconds


def locals_cpu_ms_per_hour(run: Run) -> float:
    seconds = run.idle[-1].at - run.idle[0].at
    start, end = run.locals_cpu
    return (end - start) / len(run.locals) * 3600 / seconds * 1000


# ------------------------------------------------------------------------------ report


def render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def state_table(run: Run) -> list[str]:
    assert run.alone is not None and run.one is not None
    n = len(run.locals)
    states = [run.alone[1], run.one, run.idle[0], run.idle[-1]]
    rows = [
        ["server.py", "alone", "1 local", f"{n} locals, idle start", "idle end"],
        ["RSS (KB)", *(str(u.rss_kb) for u in states)],
        ["threads", *(str(u.threads) for u in states)],
        ["open fds", *(str(u.fds) for u in states)],
        ["sessions open", *(str(count) for count in run.sessions)],
    ]
    return render(rows)


def per_local_rows(run: Run, record: int) -> list[list[str]]:
    assert run.alone is not None and run.one is not None
    n, alone, start, end = len(run.locals), run.alone[1], run.idle[0], run.idle[-1]
    threads = [u.threads for u in run.idle]
    cpu_each, cpu_spent, cpu_own = server_cpu_ms_per_hour(run)
    marginal = (start.rss_kb - run.one.rss_kb) / (n - 1)
    return [
        [
            "RSS",
            f"+{(start.rss_kb - alone.rss_kb) / n:.0f} KB",
            f"(idle start - alone) / {n}; each after the first: +{marginal:.0f} KB; "
            f"the first: +{run.one.rss_kb - alone.rss_kb} KB",
        ],
        [
            "threads",
            f"{(statistics.median(threads) - alone.threads) / n:.2f}",
            f"(median of the idle samples - alone) / {n}; samples {min(threads)}..{max(threads)}",
        ],
        ["open fds", f"{(start.fds - alone.fds) / n:.2f}", "its session's socket"],
        [
            "CPU",
            f"{cpu_each:.0f} ms per hour",
            f"server CPU in the idle period {cpu_spent:.0f} ms, of which {cpu_own:.0f} ms its "
            f"own rate alone; tick = +-{cpu_resolution_ms_per_hour(run):.0f} ms/h per local; "
            f"{cpu_each * ping_interval(run) / 3600:.2f} ms per PING/PONG",
        ],
        [
            "RSS growth",
            f"{end.rss_kb - start.rss_kb:+d} KB",
            "in all, idle start to end: " + " ".join(str(u.rss_kb) for u in run.idle) + " KB",
        ],
        *wire_rows(run, record),
    ]


def wire_rows(run: Run, record: int) -> list[list[str]]:
    low, high = KEEPALIVE_INTERVAL, KEEPALIVE_INTERVAL + KEEPALIVE_TICK
    expected = f"{per_minute(record, high):.0f}..{per_minute(record, low):.0f} B/min each way"
    rows = [
        [
            "keepalive",
            expected,
            f"protocol: a {record} B PING record up and a {record} B PONG down after "
            f"{low:g}..{high:g} s of silence (TCP payload)",
        ],
    ]
    seen = wire(run)
    if seen.interval is None:
        return [*rows, ["  on the wire", "-", f"fewer than 2 PINGs in {seen.seconds:.0f} s"]]
    sizes = sorted({size for _, size in seen.up + seen.down})
    rows.append(
        [
            "  on the wire",
            f"{per_minute(record, seen.interval):.0f} B/min each way",
            f"counting relay, 1 local: {len(seen.up)} chunks up, {len(seen.down)} down in "
            f"{seen.seconds:.0f} s, sizes {sizes} B, a PING every {seen.interval:.2f} s",
        ]
    )
    return rows


def summary(run: Run, record: int) -> str:
    assert run.alone is not None
    n = len(run.locals)
    rss = (run.idle[0].rss_kb - run.alone[1].rss_kb) / n
    threads = (statistics.median(u.threads for u in run.idle) - run.alone[1].threads) / n
    return (
        f"per idle local: RSS +{rss:.0f} KB, {threads:.2f} thread, "
        f"{server_cpu_ms_per_hour(run)[0]:.0f} ms server CPU per hour, "
        f"{per_minute(record, ping_interval(run)):.0f} bytes/min each way"
    )


def report(run: Run) -> list[str]:
    record = keepalive_record_size()
    n = len(run.locals)
    locals_rss = statistics.mean(run.locals_rss_kb) / 1024
    lines = [
        f"sockproxy idle cost: {n} idle locals, idle period {run.idle[-1].at - run.idle[0].at:.0f}"
        f" s after {run.args.settle:g} s to settle; git {git_revision()}, {os.cpu_count()} cores",
        "load average (1/5/15 min): "
        + "; ".join(f"{when} {value}" for when, value in run.loads.items()),
        f"keepalive: ping after {KEEPALIVE_INTERVAL:g} s of silence (client/tunnel.py); the "
        f"server gives up a session silent for {SESSION_TIMEOUT:g} s (server/handler.py)",
        "",
        *state_table(run),
        "",
        f"per idle local (server.py, {n} locals):",
        *("  " + line for line in render(per_local_rows(run, record))),
        "",
        f"each local.py itself: RSS {locals_rss:.1f} MB, CPU "
        f"{locals_cpu_ms_per_hour(run):.0f} ms per hour while idle",
        f"server.py exit code on SIGTERM: {run.server_exit}",
    ]
    if run.sessions[-1] != n:
        lines.append(f"PROBLEM: {run.sessions[-1]} of {n} sessions open at the end of idle")
    return [*lines, "", summary(run, record)]


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--locals", type=int, default=50, help="idle locals, at least 2 [50]")
    p.add_argument("--idle", type=float, default=60.0, help="idle period in seconds [60]")
    p.add_argument("--settle", type=float, default=10.0, help="seconds before it [10]")
    p.add_argument("--baseline", type=float, default=10.0, help="seconds alone [10]")
    p.add_argument("--bits", type=int, default=3072, help="RSA key size [3072]")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args(argv)
    if args.locals < 2 or args.idle < SAMPLE_EVERY:
        p.error(f"--locals must be at least 2 and --idle at least {SAMPLE_EVERY:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on(signal.SIGTERM)
    tmp = Path(tempfile.mkdtemp(prefix="sockproxy-idle-"))
    run = Run(args, Processes(), tmp, Destination())
    run.loads["start"] = load()
    try:
        measure(run)
    except (PeerError, KeyboardInterrupt) as exc:
        log(f"stopped early: {type(exc).__name__}: {exc}")
        return 1
    finally:
        stop_everything(run)
        run.destination.close()
        remove_tmp(tmp, args.keep_tmp)
    print("\n".join(report(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
