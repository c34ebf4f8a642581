#!/usr/bin/env python3
"""Run the hardening suite against the real programs and print one table.

    python3 scripts/harden.py [--slowloris 1000] [--flood 1000] [--repeat 3]
                              [--fuzz-iterations 2000] [--probe-rounds 10]
                              [--no-fuzz] [--no-attacks]

Each row is an attack or a fault: slowloris (silent and one-byte-a-second connections) at
the local's SOCKS port and at the server's port, a max_connections flood of each program,
kill -9 of the server, a destination or a client in the middle of a transfer, a
destination that never reads, failover between two servers, a stranger's probes at the
server (random bytes, HTTP and TLS hellos, truncated, altered, replayed, stale and forged
ClientInits: no byte back, a close at handshake_timeout, no RSA private-key operation),
then scripts/fuzz.py and the man-in-the-middle attack tests (tests/test_attacks.py). The columns:
how many tries, what happened, bytes lost or corrupted without the client being told
(must be 0), and the programs' file descriptors and threads before/after (read once the
worker pool's idle threads have exited; if they have not within keep_idle + 1 s, up to
max_idle idle threads are tolerated). The scenarios are shared with tests/test_faults.py
(tests/faults_support.py).

Keys are fresh 2048-bit pairs from utils/genkey.py in a temporary folder; everything
listens on 127.0.0.1 only. Exit status 0 only if every row passed.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402  (pytest.fail.Exception: what the launcher raises)

from tests.conftest import Keys, Launcher, TCPServer, wait_for  # noqa: E402
from tests.faults_support import (  # noqa: E402
    POOL_KEEP_IDLE,
    POOL_MAX_IDLE,
    SETTINGS,
    Accounting,
    KillReport,
    Source,
    failover_scenario,
    flood_scenario,
    kill_client_scenario,
    kill_destination_scenario,
    kill_server_scenario,
    raise_nofile,
    slowloris_scenario,
    stuck_destination_scenario,
)
from tests.hardening_support import (  # noqa: E402
    ProbeResult,
    client_init,
    probe,
    rsa_operations,
    server_public,
    stranger_probes,
)
from utils.keys import load_private_key  # noqa: E402
from utils.mux import open_frame  # noqa: E402

HEADERS = (
    "attack or fault",
    "tries",
    "outcomes",
    "bytes lost/corrupted",
    "fds before/after",
    "threads before/after",
    "result",
)


@dataclass
class Row:
    name: str
    tries: int
    outcomes: str
    bad_bytes: int | None = 0
    fds: str = "-"
    threads: str = "-"
    problems: list[str] = field(default_factory=list)
    skipped: bool = False

    @property
    def passed(self) -> bool:
        return not self.problems and not self.bad_bytes

    def cells(self) -> tuple[str, ...]:
        bad = "-" if self.bad_bytes is None else str(self.bad_bytes)
        verdict = "skipped" if self.skipped else "pass" if self.passed else "FAIL"
        return (self.name, str(self.tries), self.outcomes, bad, self.fds, self.threads, verdict)


def _escape(text: str) -> str:
    return text.replace("|", "/")


def print_table(rows: list[Row]) -> None:
    """A Markdown table: readable in a terminal and pastable into docs/SECURITY.md."""
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "|".join(" --- " for _ in HEADERS) + "|")
    for row in rows:
        print("| " + " | ".join(_escape(cell) for cell in row.cells()) + " |")


# --------------------------------------------------------------------------- running scenarios


class Bench:
    """Keys, a destination and a fresh launcher (own folder) per scenario."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.keys = make_keys(directory / "keys")
        self.source = Source()
        self._count = 0

    def close(self) -> None:
        self.source.close()

    def run(self, name: str, scenario: Callable[[Launcher], Any]) -> tuple[Any, list[str]]:
        """Run one scenario; returns its report (None if it crashed) and extra problems."""
        self._count += 1
        folder = self.dir / f"{self._count:02d}"
        folder.mkdir()
        launcher = Launcher(self.keys, folder)
        problems: list[str] = []
        report = None
        started = time.monotonic()
        try:
            report = scenario(launcher)
        except (Exception, pytest.fail.Exception) as exc:  # noqa: BLE001 (a crash is a row)
            problems.append(f"{name} crashed: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            try:
                launcher.stop_all()  # every program must exit 0 on SIGTERM
            except AssertionError as exc:
                problems.append(f"stop: {str(exc)[:300]}")
        print(f"  {name}: {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
        return report, problems


def make_keys(directory: Path) -> Keys:
    base = [sys.executable, "utils/genkey.py", "--dir", str(directory), "--bits", "2048"]
    for command in (base, [*base, "--name", "other"]):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"harden: genkey failed: {done.stderr.strip()}")
    return Keys(directory)


def _columns(accounting: Accounting) -> tuple[str, str]:
    return accounting.column("fds"), accounting.column("threads")


def slowloris_row(bench: Bench, target: str, count: int) -> Row:
    name = f"slowloris -> {target} ({count} conns, half 1 byte/s)"
    report, problems = bench.run(
        name,
        lambda launcher: slowloris_scenario(
            launcher, bench.source, target, count, slack=max(2.0, count / 250)
        ),
    )
    if report is None:
        return Row(name, count, "crashed", None, problems=problems)
    fds, threads = _columns(report.accounting)
    return Row(
        name,
        count,
        report.outcome(),
        report.bad_bytes,
        fds,
        threads,
        report.problems() + problems,
    )


def flood_row(bench: Bench, target: str, attempts: int) -> Row:
    name = f"max_connections=20 flood -> {target}"
    report, problems = bench.run(
        name, lambda launcher: flood_scenario(launcher, bench.source, target, 20, attempts)
    )
    if report is None:
        return Row(name, attempts, "crashed", None, problems=problems)
    fds, threads = _columns(report.accounting)
    bad = report.works_after.bad_bytes
    return Row(name, attempts, report.outcome(), bad, fds, threads, report.problems() + problems)


def repeated_row(
    bench: Bench, name: str, repeat: int, scenario: Callable[[Launcher, Source], KillReport]
) -> Row:
    reports: list[KillReport] = []
    problems: list[str] = []
    for _ in range(repeat):
        report, extra = bench.run(name, lambda launcher: scenario(launcher, bench.source))
        problems += extra
        if report is not None:
            reports.append(report)
            problems += report.problems()
    if not reports:
        return Row(name, repeat, "crashed", None, problems=problems)
    endings = sorted({r.ended for r in reports})
    slowest = max(r.detect_seconds for r in reports)
    clean = sum(1 for r in reports if not r.problems())
    outcome = (
        f"{clean}/{repeat} as expected: {'/'.join(endings)} within {slowest:.2f}s "
        f"(limit {reports[0].detect_limit:g}s); " + reports[-1].outcome()
    )
    fds, threads = _columns(reports[-1].accounting)
    bad = sum(r.bad_bytes for r in reports)
    return Row(name, repeat, outcome, bad, fds, threads, problems)


def failover_row(bench: Bench) -> Row:
    name = "failover: kill -9 first of 2 servers, restart it"
    report, problems = bench.run(name, lambda launcher: failover_scenario(launcher, bench.source))
    if report is None:
        return Row(name, 1, "crashed", None, problems=problems)
    bad = sum(d.bad_bytes for d in report.downloads)
    return Row(name, len(report.downloads), report.outcome(), bad, problems=report.problems())


# --------------------------------------------------------------------------- other tools


def fuzz_row(iterations: int) -> Row:
    name = "fuzz (scripts/fuzz.py)"
    script = ROOT / "scripts" / "fuzz.py"
    if not script.exists():
        return Row(name, 0, "scripts/fuzz.py does not exist yet", None, skipped=True)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--iterations", str(iterations)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Row(name, iterations, "timed out after 1800 s", None, problems=["timeout"])
    print(f"  {name}: {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip() if lines else (done.stderr.strip().splitlines() or ["-"])[-1]
    problems = [] if done.returncode == 0 else [f"fuzz.py exited {done.returncode}"]
    return Row(name, iterations, f"exit {done.returncode}: {summary}", None, problems=problems)


def attacks_row() -> Row:
    name = "MITM attacks (tests/test_attacks.py)"
    if not (ROOT / "tests" / "test_attacks.py").exists():
        return Row(name, 0, "tests/test_attacks.py does not exist yet", None, skipped=True)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_attacks.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    print(f"  {name}: {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    counts = dict(
        (word, int(number))
        for number, word in re.findall(
            r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", done.stdout
        )
    )
    tries = sum(counts.values())
    summary = ", ".join(f"{n} {w}" for w, n in counts.items()) or done.stdout[-200:]
    problems = [] if done.returncode == 0 else [f"pytest exited {done.returncode}"]
    return Row(name, tries, summary, None, problems=problems)


PROBE_TIMEOUT = 2.0  # the server's handshake_timeout in the probe row
PROBE_SLACK = 0.5  # a close this much after it is late


@dataclass
class ProbeReport:
    results: list[ProbeResult]
    rsa_before: int
    rsa_after: int
    destination_connections: int

    def problems(self) -> list[str]:
        found = []
        answered = [r for r in self.results if r.bytes_back]
        if answered:
            found.append(f"{len(answered)} probes got bytes back, e.g. {answered[0]}")
        odd = [
            r
            for r in self.results
            if not PROBE_TIMEOUT - 0.1 <= r.seconds <= PROBE_TIMEOUT + PROBE_SLACK
        ]
        if odd:
            found.append(f"{len(odd)} closed outside the timeout +{PROBE_SLACK:g} s: {odd[0]}")
        if self.rsa_after != self.rsa_before:
            found.append(f"rsa private-key operations {self.rsa_before} -> {self.rsa_after}")
        if self.destination_connections:
            found.append(f"{self.destination_connections} destination connections")
        return found

    def outcome(self) -> str:
        times = [r.seconds for r in self.results]
        return (
            f"bytes back: max {max((r.bytes_back for r in self.results), default=0)}; closed "
            f"{min(times, default=0):.3f}..{max(times, default=0):.3f} s after the connect "
            f"(handshake_timeout {PROBE_TIMEOUT:g} s); rsa private-key operations "
            f"{self.rsa_before} -> {self.rsa_after}; destination connections: "
            f"{self.destination_connections}"
        )


def probe_scenario(launcher: Launcher, rounds: int) -> ProbeReport:
    """Every probe of tests/hardening_support.stranger_probes ``rounds`` times, with and
    without a FIN, side by side: no byte back, a close at handshake_timeout, no RSA work."""
    server = launcher.server(handshake_timeout=PROBE_TIMEOUT)
    listener = TCPServer(lambda conn, _peer: conn.close())
    # The genuine ClientInit's own request goes to a destination of its own: it is acted on
    # once, and only its replay (one of the probes) could reach it a second time.
    genuine_destination = TCPServer(lambda conn, _peer: conn.close())
    try:
        local = load_private_key(launcher.keys.dir / "local_private.pem")
        port = genuine_destination.port.to_bytes(2, "big")
        request = b"\x01\x01\x7f\x00\x00\x01" + port
        genuine = client_init(
            local, server_public(launcher.keys.dir / "server_public.pem"), open_frame(1, request)
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(genuine)  # accepted once: the server connects to its destination
            sock.recv(65536)
        wait_for(lambda: len(genuine_destination.peers) >= 1, 10)
        before = rsa_operations(server)
        jobs = [
            (name, data, fin)
            for _ in range(rounds)
            for name, data in stranger_probes(launcher.keys.dir, listener.port, genuine).items()
            for fin in (False, True)
        ]
        with ThreadPoolExecutor(64) as pool:
            results = list(
                pool.map(lambda j: probe(server.port, j[0], j[1], j[2], PROBE_TIMEOUT + 5), jobs)
            )
        reached = len(listener.peers) + len(genuine_destination.peers) - 1
        return ProbeReport(results, before, rsa_operations(server), reached)
    finally:
        listener.close()
        genuine_destination.close()


def probes_row(bench: Bench, rounds: int) -> Row:
    name = f"stranger probes (18 kinds, FIN or not, x{rounds})"
    report, problems = bench.run(name, lambda launcher: probe_scenario(launcher, rounds))
    if report is None:
        return Row(name, 0, "crashed", None, problems=problems)
    return Row(
        name, len(report.results), report.outcome(), None, problems=report.problems() + problems
    )


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harden.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slowloris", type=int, default=1000, help="connections per program")
    parser.add_argument("--flood", type=int, default=1000, help="refused connection attempts")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kill -9 fault")
    parser.add_argument("--fuzz-iterations", type=int, default=2000)
    parser.add_argument("--probe-rounds", type=int, default=10, help="rounds of stranger probes")
    parser.add_argument("--no-fuzz", action="store_true", help="do not run scripts/fuzz.py")
    parser.add_argument("--no-attacks", action="store_true", help="skip tests/test_attacks.py")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    SETTINGS.wait_for_idle_pool = True  # "threads after" without the pool's idle threads
    started = time.monotonic()
    reason = raise_nofile(4 * args.slowloris + 1024)
    if reason:
        print(f"harden: {reason}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="harden-") as tmp:
        bench = Bench(Path(tmp))
        try:
            for target in ("local", "server"):
                rows.append(slowloris_row(bench, target, args.slowloris))
            for target in ("local", "server"):
                rows.append(flood_row(bench, target, args.flood))
            for name, scenario in (
                ("kill -9 server mid-download", kill_server_scenario),
                ("kill -9 destination mid-download", kill_destination_scenario),
                ("kill -9 client mid-download", kill_client_scenario),
            ):
                rows.append(repeated_row(bench, name, args.repeat, scenario))
            rows.append(
                repeated_row(
                    bench, "destination never reads (idle_timeout 3 s)", 1,
                    stuck_destination_scenario,
                )
            )  # fmt: skip
            rows.append(failover_row(bench))
            rows.append(probes_row(bench, args.probe_rounds))
        finally:
            bench.close()
    if not args.no_fuzz:
        rows.append(fuzz_row(args.fuzz_iterations))
    if not args.no_attacks:
        rows.append(attacks_row())
    elapsed = time.monotonic() - started
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"sockproxy hardening run, {stamp}: python3 scripts/harden.py {' '.join(sys.argv[1:])}")
    print()
    print_table(rows)
    print()
    print(
        f"threads after: read once the worker pool's idle threads have exited "
        f"(keep_idle {POOL_KEEP_IDLE:g} s), else tolerated up to {POOL_MAX_IDLE} idle ones"
    )
    failed = [row for row in rows if not row.passed]
    for row in failed:
        for problem in row.problems or [f"{row.bad_bytes} bytes lost or corrupted"]:
            print(f"FAIL {row.name}: {problem}")
    verdict = "all passed" if not failed else f"{len(failed)} row(s) FAILED"
    print(f"{len(rows)} rows, {verdict}, in {elapsed:.0f} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
