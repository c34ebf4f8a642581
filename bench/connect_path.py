#!/usr/bin/env python3
"""Where a new connection's time goes on loopback: sockproxy against ``ssh -D``.

    python3 bench/connect_path.py                          # sockproxy and ssh, full counts
    python3 bench/connect_path.py --connects 100 --rounds 3
    python3 bench/connect_path.py --peers sockproxy --markdown

The destination is a thread-per-connection TCP echo server inside this script. For each
system (started on free 127.0.0.1 ports, stopped by PID, everything in a temporary folder):

- phases: --connects sequential new connections (after --warmup ones), each timed at the
  SOCKS greeting (05 01 00 -> method answer), the CONNECT to 127.0.0.1:echo (-> the 10-byte
  reply) and one echoed byte; medians, "back-to-back" (no pause) and "isolated" (--gap ms
  between connections: the machine is idle when each starts, so thread wake-ups show);
- cpu: user+sys CPU (/proc/PID/stat, with children and descendants) of the client half and
  of the server half per new connection, over --cpu-connects back-to-back connections (ssh:
  the ssh client; the sshd listener and its per-session children);
- burst: --burst connections opened at once and driven by one selector, each timed from the
  burst start to its echo byte; the median and the slowest, medians over --rounds rounds
  --burst-gap seconds apart (idle workers expire as between page loads).

The raw figures go to bench/results/connect-path-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import selectors
import shlex
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import ssh_label, ssh_missing, start_sockproxy, start_ssh
from bench.procs import (
    PeerError,
    Proc,
    Processes,
    descendants,
    git_revision,
    interrupt_on,
    log,
    remove_tmp,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEERS = ("sockproxy", "ssh")
PHASES = ("greeting", "request", "echo", "total")
MODES = ("back-to-back", "isolated")
TICK = os.sysconf("SC_CLK_TCK")
NONE = "\u2013"  # an en dash: no figure


class Echo(socketserver.ThreadingTCPServer):
    """The destination: 127.0.0.1 on a free port, one thread per connection echoes to EOF."""

    daemon_threads = True
    request_queue_size = 512

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Echoing)
        self.port: int = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class Echoing(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


def exchange(echo: int) -> tuple[tuple[bytes, int], ...]:
    """What a connection sends and how many bytes each answer has: greeting, CONNECT, echo."""
    request = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + echo.to_bytes(2, "big")
    return (b"\x05\x01\x00", 2), (request, 10), (b"x", 1)


def check(answer: bytes, stage: int) -> None:
    """``stage``: 0 the method answer, 1 the CONNECT reply, 2 the echoed byte."""
    good = (answer == b"\x05\x00", answer[:4] == b"\x05\x00\x00\x01", answer == b"x")[stage]
    if not good:
        raise OSError(f"unexpected {('method answer', 'reply', 'echo')[stage]}: {answer.hex()}")


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def step(sock: socket.socket, send: bytes, size: int, stage: int) -> float:
    """Send, read and check the answer; the time it came."""
    sock.sendall(send)
    check(recv_exact(sock, size), stage)
    return time.perf_counter()


def connections(
    socks: int, echo: int, count: int, gap: float, errors: list[str]
) -> dict[str, list[float]]:
    """``count`` sequential connections; each phase's seconds (failed connections: errors)."""
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    moves = exchange(echo)
    for _ in range(count):
        time.sleep(gap)
        try:
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", socks), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t1, t2, t3 = (step(sock, *move, stage) for stage, move in enumerate(moves))
        except OSError as exc:
            errors.append(f"connection: {exc}")
            continue
        for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            times[phase].append(seconds)
    return times


def burst(socks: int, echo: int, count: int, errors: list[str]) -> list[float]:
    """``count`` connections at once, one selector; each one's seconds to its echo byte."""
    moves = exchange(echo)
    selector, done = selectors.DefaultSelector(), list[float]()
    start = time.perf_counter()
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", socks))
        selector.register(sock, selectors.EVENT_WRITE, [sock, -1, b""])  # stage, bytes read
    while selector.get_map() and time.perf_counter() < start + 30:
        for key, _ in selector.select(timeout=1):
            state = key.data
            sock, stage = state[0], state[1]
            try:
                if stage == -1:  # the connect finished (or failed)
                    if error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise OSError(error, os.strerror(error))
                    selector.modify(sock, selectors.EVENT_READ, state)
                else:
                    if not (chunk := sock.recv(16)):
                        raise OSError("connection closed")
                    state[2] += chunk
                    if len(state[2]) < moves[stage][1]:
                        continue
                    check(state[2], stage)
                if stage < 2:
                    state[1:] = [stage + 1, b""]
                    sock.send(moves[stage + 1][0])  # a few bytes, an empty buffer: all of them
                    continue
                done.append(time.perf_counter() - start)  # its echo byte: done, closed below
            except OSError as exc:
                errors.append(f"burst: {exc}")
            selector.unregister(sock)
            sock.close()
    for key in list(selector.get_map().values()):
        errors.append("burst: no echo within 30 s")
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()
    return done


def cpu_seconds(root: int) -> float:
    """utime+stime+cutime+cstime of ``root`` and its descendants."""
    ticks = 0
    for pid in [root, *descendants(root)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / TICK


@dataclass
class Figures:
    """One system's raw figures (seconds, except cpu_ms)."""

    label: str
    phases: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # mode -> phase
    cpu_ms: dict[str, float] = field(default_factory=dict)  # half -> ms per connection
    bursts: list[list[float]] = field(default_factory=list)  # per round, per connection
    errors: list[str] = field(default_factory=list)


def start(key: str, procs: Processes, tmp: Path, bits: int) -> tuple[int, int, int, list[Proc]]:
    """The SOCKS port, the client half's and server half's PIDs, the processes in stop order."""
    if key == "sockproxy":
        pair = start_sockproxy(procs, tmp / "sockproxy", bits)
        return pair.local_port, pair.local.pid, pair.server.pid, [pair.local, pair.server]
    running = start_ssh(procs, tmp / "ssh")
    client, sshd = running.procs
    assert running.socks_port is not None
    return running.socks_port, client.pid, sshd.pid, running.procs


def measure(key: str, args: argparse.Namespace, procs: Processes, tmp: Path, echo: int) -> Figures:
    figures = Figures(f"sockproxy (RSA-{args.bits})" if key == "sockproxy" else ssh_label())
    errors = figures.errors
    stop: list[Proc] = []
    try:
        socks, client, server, stop = start(key, procs, tmp, args.bits)
        for mode, gap in zip(MODES, (0.0, args.gap / 1000), strict=True):
            connections(socks, echo, args.warmup, gap, errors)
            figures.phases[mode] = connections(socks, echo, args.connects, gap, errors)
        before = cpu_seconds(client), cpu_seconds(server)
        connections(socks, echo, args.cpu_connects, 0.0, errors)
        after = cpu_seconds(client), cpu_seconds(server)
        for half, b, a in zip(("client", "server"), before, after, strict=True):
            figures.cpu_ms[half] = (a - b) * 1000 / args.cpu_connects
        for _ in range(args.rounds):
            time.sleep(args.burst_gap)
            figures.bursts.append(burst(socks, echo, args.burst, errors))
    except (PeerError, OSError, subprocess.SubprocessError) as exc:
        errors.append(f"{key} failed: {exc}")
        log(f"{key} FAILED: {exc}")
    finally:
        for proc in stop:
            stopped = procs.stop(proc)
            if key == "sockproxy" and (stopped.forced or stopped.exit_code != 0):
                errors.append(f"{proc.name} exited with {stopped.exit_code} on SIGTERM")
    return figures


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f}" if values else NONE


def table_rows(results: dict[str, Figures], args: argparse.Namespace) -> list[list[str]]:
    rows = [
        [
            "system",
            *(f"{name} ms" for name in ("greeting", "request->reply", "first echo", "total")),
            "CPU ms/conn client / server",
            f"burst {args.burst}: median / slowest ms",
        ]
    ]
    for figures in results.values():
        bad = f" ({len(figures.errors)} errors)" if figures.errors else ""
        row = [figures.label + bad]
        for phase in PHASES:
            modes = [figures.phases.get(mode, {}).get(phase, []) for mode in MODES]
            row.append(" / ".join(_ms(values) for values in modes))
        cpu = [figures.cpu_ms.get(half) for half in ("client", "server")]
        row.append(" / ".join(NONE if c is None else f"{c:.2f}" for c in cpu))
        rounds = [r for r in figures.bursts if r]
        medians = [statistics.median(r) for r in rounds]
        row.append(f"{_ms(medians)} / {_ms([max(r) for r in rounds])}")
        rows.append(row)
    return rows


def render(rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "| --- |" + " ---: |" * (len(rows[0]) - 1)]
        return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rows = [[cell.replace("`", "") for cell in row] for row in rows]
    lines = []
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--peers", default=",".join(PEERS), help=f"{','.join(PEERS)} [both]")
    p.add_argument("--connects", type=int, default=200, help="sequential connections [200]")
    p.add_argument("--warmup", type=int, default=20, help="warm-up connections per mode [20]")
    p.add_argument("--gap", type=float, default=20, help="ms between isolated connections [20]")
    p.add_argument("--cpu-connects", type=int, default=1000, help="connections for CPU [1000]")
    p.add_argument("--burst", type=int, default=50, help="connections at once [50]")
    p.add_argument("--rounds", type=int, default=10, help="bursts, medians [10]")
    p.add_argument("--burst-gap", type=float, default=3, help="seconds before each burst [3]")
    p.add_argument("--bits", type=int, default=3072, help="sockproxy RSA key size [3072]")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args(argv)
    args.peers = [name.strip() for name in args.peers.split(",") if name.strip()]
    if not args.peers or set(args.peers) - set(PEERS):
        p.error(f"--peers: one or more of {','.join(PEERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on(signal.SIGTERM)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_revision(),
        "nproc": os.cpu_count(),
        "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": shlex.join(["python3", "bench/connect_path.py", *sys.argv[1:]]),
        "args": vars(args),
    }
    notes = []
    if "ssh" in args.peers and (missing := ssh_missing()):
        notes.append(f"ssh: not measured ({missing})")
        args.peers.remove("ssh")
    procs, echo = Processes(), Echo()
    tmp = Path(tempfile.mkdtemp(prefix="sockproxy-cpath-"))
    results: dict[str, Figures] = {}
    code = 0
    try:
        for key in args.peers:
            log(f"===== {key}")
            results[key] = measure(key, args, procs, tmp, echo.port)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        code = 130
    finally:
        procs.stop_all()
        echo.shutdown()
        echo.server_close()
        remove_tmp(tmp, args.keep_tmp)
    for key, figures in results.items():
        for error in sorted(set(figures.errors)):
            notes.append(f"{key}: {figures.errors.count(error)}x {error}")
    print(
        f"Connect path (bench/connect_path.py), {meta['date']}, git {meta['git']}, "
        f"{meta['nproc']} cores, load average {meta['load']}\ncommand: {meta['command']}\n"
        f"Phases: medians of {args.connects} sequential connections, back-to-back / isolated "
        f"({args.gap:g} ms apart). CPU: over {args.cpu_connects} back-to-back connections. "
        f"Burst: medians over {args.rounds} rounds, {args.burst_gap:g} s apart.\n"
    )
    print("\n".join(render(table_rows(results, args), args.markdown) + notes))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"connect-path-{stamp}.json"
    runs = {key: asdict(figures) for key, figures in results.items()}
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    log(f"raw figures: {path}")
    failed = any(f.errors for k, f in results.items() if k == "sockproxy")
    return code or int(failed)


if __name__ == "__main__":
    sys.exit(main())
