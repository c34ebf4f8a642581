#!/usr/bin/env python3
"""WAN benchmark: sockproxy and its peers with a delay relay on the link, at several RTTs.

    python3 bench/wan.py                                  # all peers at RTT 20, 50, 150 ms
    python3 bench/wan.py --rtt 50 --peers sockproxy,ssh --samples 21
    python3 bench/wan.py --sockproxy-config-extra '{"fast_open": true}' --markdown

The kernel here has no netem, so bench/delayrelay.py (one process per link, at niceness -10
where allowed: it plays the network, whose clock should not wait for the CPU) sits between
each system's client half and server half and models one TCP path of the given RTT:

- sockproxy: local.py -> relay -> server.py;
- OpenSSH: ``ssh -N -D -c aes256-gcm@openssh.com`` -> relay -> a private sshd;
- shadowsocks-libev (aes-256-gcm): ss-local -> relay -> ss-server;
- microsocks (plain SOCKS5, no crypto) is reached across the link: client -> relay -> it;
- plain TCP (calibration): the client -> relay -> the destination, no proxy: ideally
  exactly 2 RTT (TCP handshake, then the request), which shows the relay's error.

The SOCKS client (this script) and the destination (a tiny HTTP server on 127.0.0.1
answering GET with a small body) sit on loopback with no delay. One sample: a new SOCKS5
connection (no auth), CONNECT to the name "localhost" (ATYP 3, resolved by the proxy), wait
for the reply, send an HTTP GET, read the first byte: time to first byte (TTFB); the whole
response is read and checked too. For each RTT and system:

- new connection: the median TTFB of --samples sequential connections, after one warm-up
  connection, so that a persistent session or tunnel (ssh's session, sockproxy's session)
  exists. For sockproxy also "cold": a fresh local.py, its first connection (median of
  --cold-samples fresh locals);
- page: 24 fetches, 6 at a time (wall time from the first connect to the last byte);
- burst: 50 new connections at once (the median and the slowest per-connection TTFB).

Figures are in ms and in RTTs. Every process is started fresh on free loopback ports and
stopped by PID. Missing peers are installed with apt-get (unless --no-install). The raw
figures go to bench/results/wan-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fetcher import Destination, Result, Target, run_fetches
from bench.peers import (
    Link,
    Running,
    SockproxyOptions,
    microsocks_label,
    microsocks_missing,
    ss_label,
    ss_missing,
    ssh_label,
    ssh_missing,
    start_microsocks,
    start_sockproxy,
    start_sockproxy_local,
    start_ss,
    start_ssh,
)
from bench.procs import (
    PeerError,
    Proc,
    Processes,
    free_ports,
    git_revision,
    install_apt_peers,
    interrupt_on,
    log,
    remove_tmp,
)
from bench.procs import wait_for_port as wait_listening

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
RELAY = Path(__file__).resolve().parent / "delayrelay.py"

PEERS = ("sockproxy", "ssh", "ss", "microsocks", "tcp")
PAGE_FETCHES = 24
PAGE_PARALLEL = 6
BURST = 50
NONE = "\u2013"  # an en dash: no figure


# ------------------------------------------------------------------------------ measurements


@dataclass
class Figures:
    """What one system did at one RTT (seconds)."""

    ttfb: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    page_wall: float | None = None
    burst: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def fetches(
    ctx: Context, figures: Figures, target: Target, count: int, parallel: int
) -> list[Result]:
    """Run them; the failed ones go to ``figures.errors``, the rest are returned."""
    results = run_fetches(ctx.destination, target, count, parallel)
    figures.errors += [r.error for r in results if r.error is not None]
    return [r for r in results if r.error is None]


def measure_sequential(ctx: Context, figures: Figures, target: Target) -> None:
    fetches(ctx, figures, target, 1, 1)  # the warm-up: a session or tunnel exists after it
    results = fetches(ctx, figures, target, ctx.args.samples, 1)
    figures.ttfb += [r.ttfb for r in results if r.ttfb is not None]


def measure_page(ctx: Context, figures: Figures, target: Target) -> None:
    """PAGE_FETCHES fetches, PAGE_PARALLEL at a time, like a browser's connection limit."""
    results = fetches(ctx, figures, target, PAGE_FETCHES, PAGE_PARALLEL)
    if len(results) == PAGE_FETCHES:
        ends = [r.ended for r in results if r.ended is not None]
        figures.page_wall = max(ends) - min(r.started for r in results)


def measure_burst(ctx: Context, figures: Figures, target: Target) -> None:
    """BURST new connections started at once; each one's TTFB."""
    results = fetches(ctx, figures, target, BURST, BURST)
    figures.burst += [r.ttfb for r in results if r.ttfb is not None]


# ------------------------------------------------------------------------------ systems


@dataclass
class Sitting:
    """One system at one RTT: its processes, its relays, where a fetch goes."""

    running: Running
    relays: list[Proc]
    target: Target
    restart_local: Callable[[], Target] | None = None  # sockproxy: a fresh local.py


@dataclass
class Context:
    args: argparse.Namespace
    procs: Processes
    tmp: Path
    destination: Destination


def relay_link(ctx: Context, rtt_ms: float, relays: list[Proc]) -> Link:
    """A link that starts a delay relay process in front of the port it is given."""

    def link(upstream_port: int) -> int:
        (port,) = free_ports(1)
        command = [sys.executable, str(RELAY), "--port", str(port)]
        command += ["--upstream-port", str(upstream_port), "--rtt-ms", str(rtt_ms)]
        command += ["--nice", str(ctx.args.relay_nice)]
        proc = ctx.procs.start("delayrelay", command, None)
        relays.append(proc)
        wait_listening(port, [proc])
        return port

    return link


def sit_sockproxy(ctx: Context, rtt_ms: float, relays: list[Proc]) -> Sitting:
    link = relay_link(ctx, rtt_ms, relays)
    relay_ports: list[int] = []

    def recording_link(port: int) -> int:
        relay_ports.append(link(port))
        return relay_ports[-1]

    options = SockproxyOptions(local_extra=ctx.args.sockproxy_config_extra)
    workdir = ctx.tmp / "sockproxy"
    pair = start_sockproxy(ctx.procs, workdir, ctx.args.bits, link=recording_link, options=options)
    procs = [pair.local, pair.server]
    running = Running(pair.local_port, [], procs, must_exit_zero=True)

    def restart_local() -> Target:
        ctx.procs.stop(procs[0])
        local, port = start_sockproxy_local(ctx.procs, workdir, relay_ports[0], options)
        procs[0] = local
        return Target(port, ctx.destination.port)

    return Sitting(running, relays, Target(pair.local_port, ctx.destination.port), restart_local)


def _sit_peer(
    start: Callable[[Processes, Path, Link], Running],
) -> Callable[[Context, float, list[Proc]], Sitting]:
    def sit(ctx: Context, rtt_ms: float, relays: list[Proc]) -> Sitting:
        directory = ctx.tmp / f"{start.__name__}-{rtt_ms:g}"
        running = start(ctx.procs, directory, relay_link(ctx, rtt_ms, relays))
        assert running.socks_port is not None
        return Sitting(running, relays, Target(running.socks_port, ctx.destination.port))

    return sit


def sit_tcp(ctx: Context, rtt_ms: float, relays: list[Proc]) -> Sitting:
    port = relay_link(ctx, rtt_ms, relays)(ctx.destination.port)
    return Sitting(Running(None, [], []), relays, Target(port, ctx.destination.port, socks=False))


@dataclass(frozen=True)
class System:
    key: str
    label: Callable[[argparse.Namespace], str]
    missing: Callable[[], str | None]
    sit: Callable[[Context, float, list[Proc]], Sitting]


def _sockproxy_label(args: argparse.Namespace) -> str:
    extra = args.sockproxy_config_extra
    shown = f", local config + `{json.dumps(extra)}`" if extra else ""
    return f"**sockproxy** (RSA-{args.bits}{shown})"


SYSTEMS = {
    "sockproxy": System("sockproxy", _sockproxy_label, lambda: None, sit_sockproxy),
    "ssh": System("ssh", lambda _a: ssh_label(), ssh_missing, _sit_peer(start_ssh)),
    "ss": System("ss", lambda _a: ss_label(), ss_missing, _sit_peer(start_ss)),
    "microsocks": System(
        "microsocks",
        lambda _a: f"{microsocks_label()}, reached across the link",
        microsocks_missing,
        _sit_peer(start_microsocks),
    ),
    "tcp": System(
        "tcp",
        lambda _a: "plain TCP across the link, no proxy (calibration: ideal 2 RTT)",
        lambda: None,
        sit_tcp,
    ),
}


def measure(ctx: Context, system: System, rtt_ms: float) -> Figures:
    figures = Figures()
    relays: list[Proc] = []
    sitting: Sitting | None = None
    try:
        sitting = system.sit(ctx, rtt_ms, relays)
        if sitting.restart_local is not None:
            measure_cold(ctx, figures, sitting)
        measure_sequential(ctx, figures, sitting.target)
        measure_page(ctx, figures, sitting.target)
        measure_burst(ctx, figures, sitting.target)
    except (PeerError, OSError, subprocess.SubprocessError) as exc:
        figures.errors.append(f"{system.key} failed: {exc}")
        log(f"{system.key} at {rtt_ms:g} ms FAILED: {exc}")
    finally:
        if sitting is not None:
            stop_sitting(ctx, sitting, figures)
        for relay in relays:
            ctx.procs.stop(relay)
    return figures


def measure_cold(ctx: Context, figures: Figures, sitting: Sitting) -> None:
    """The first connection of a fresh local.py (the one just started, then restarts)."""
    assert sitting.restart_local is not None
    target = sitting.target
    for index in range(ctx.args.cold_samples):
        if index:
            target = sitting.restart_local()
        figures.cold += [r.ttfb for r in fetches(ctx, figures, target, 1, 1) if r.ttfb is not None]
    sitting.target = target


def stop_sitting(ctx: Context, sitting: Sitting, figures: Figures) -> None:
    for proc in sitting.running.procs:
        stopped = ctx.procs.stop(proc)
        if sitting.running.must_exit_zero and (stopped.forced or stopped.exit_code != 0):
            figures.errors.append(f"{proc.name} exited with {stopped.exit_code} on SIGTERM")


# ------------------------------------------------------------------------------ report


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms_rtt(value: float | None, rtt_ms: float, count: int | None = None) -> str:
    if value is None:
        return NONE
    text = f"{value * 1000:.0f} ms = {value * 1000 / rtt_ms:.2f} RTT"
    return text if count is None else f"{text} (n={count})"


def _over_tcp(value: float | None, tcp: float | None, rtt_ms: float) -> str:
    """How many RTTs above the plain TCP row of the same sitting (the relay's own error and
    the machine's load are in both, so they cancel)."""
    if value is None or tcp is None:
        return ""
    return f" ({(value - tcp) * 1000 / rtt_ms:+.2f} over TCP)"


def _burst(values: list[float], rtt_ms: float) -> str:
    if not values:
        return NONE
    median, slowest = statistics.median(values), max(values)
    text = f"{median * 1000 / rtt_ms:.2f} RTT ({median * 1000:.0f} ms; slowest "
    text += f"{slowest * 1000 / rtt_ms:.1f} RTT)"
    return text if len(values) == BURST else f"{text}, only {len(values)}/{BURST} ok"


def table_rows(
    results: list[tuple[float, System, Figures]], args: argparse.Namespace
) -> list[list[str]]:
    head = [
        "RTT",
        "system",
        f"new connection: time to first byte (median of {args.samples}, warm)",
        f"page: {PAGE_FETCHES} fetches, {PAGE_PARALLEL} at a time",
        f"burst: {BURST} new connections at once, median",
    ]
    rows = [head]
    tcp = {rtt: _median(f.ttfb) for rtt, system, f in results if system.key == "tcp"}
    for rtt_ms, system, figures in results:
        label = system.label(args)
        page = _ms_rtt(figures.page_wall, rtt_ms)
        errors = f" ({len(figures.errors)} errors)" if figures.errors else ""
        ttfb = _ms_rtt(_median(figures.ttfb), rtt_ms)
        if system.key != "tcp":
            ttfb += _over_tcp(_median(figures.ttfb), tcp.get(rtt_ms), rtt_ms)
        rows.append(
            [
                f"{rtt_ms:g} ms",
                label + errors,
                ttfb,
                page,
                _burst(figures.burst, rtt_ms),
            ]
        )
        if figures.cold:
            cold = _ms_rtt(_median(figures.cold), rtt_ms)
            rows.append(
                [
                    f"{rtt_ms:g} ms",
                    f"{label}: cold (fresh local.py, first connection, median of "
                    f"{len(figures.cold)})",
                    cold,
                    NONE,
                    NONE,
                ]
            )
    return rows


def render_markdown(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "| --- | --- | ---: | ---: | ---: |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]


def render_text(rows: list[list[str]]) -> list[str]:
    plain = [[cell.replace("**", "").replace("`", "") for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in plain) for i in range(len(plain[0]))]
    lines = []
    for number, row in enumerate(plain):
        cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def header(meta: dict[str, Any], args: argparse.Namespace) -> list[str]:
    return [
        f"WAN benchmark (bench/wan.py), {meta['date']}, git {meta['git']}, "
        f"{meta['nproc']} cores, load average at start {meta['load']}",
        f"command: {meta['command']}",
        "Each sample: a new SOCKS5 connection, CONNECT to the name localhost (resolved by the "
        "proxy), the reply, an HTTP GET, the first response byte. The delay relay sits between "
        "each system's client half and server half (microsocks: between the client and it); "
        "the client and the destination are on loopback with no delay.",
        f"Warm: after one warm-up connection (a persistent session/tunnel exists); medians of "
        f"{args.samples}. Burst: per-connection TTFB, median (and the slowest). "
        "'over TCP': RTTs above the plain TCP row at the same RTT (ideally 2 RTT; what it "
        "shows above that is the harness's error under the machine's load).",
        "",
    ]


def problems(results: list[tuple[float, System, Figures]]) -> list[str]:
    lines = []
    for rtt_ms, system, figures in results:
        for error in sorted(set(figures.errors)):
            count = figures.errors.count(error)
            lines.append(f"- {system.key} at {rtt_ms:g} ms: {count}x {error}")
    return ["", "Errors:", *lines] if lines else []


def machine(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_revision(),
        "nproc": os.cpu_count(),
        "load": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "command": shlex.join(["python3", "bench/wan.py", *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items()},
    }


# ------------------------------------------------------------------------------ main


def _numbers(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"RTTs must be >= 0 ms: {text!r}")
    return values


def _peer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; known: {','.join(PEERS)}")
    return names


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"fast_open\": true}'")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rtt", type=_numbers, default=[20.0, 50.0, 150.0], help="ms [20,50,150]")
    p.add_argument("--peers", type=_peer_list, default=list(PEERS), help=",".join(PEERS))
    p.add_argument("--samples", type=int, default=11, help="sequential samples, median [11]")
    p.add_argument("--cold-samples", type=int, default=3, help="fresh local.py starts [3]")
    p.add_argument(
        "--sockproxy-config-extra",
        type=_json_object,
        default={},
        metavar="JSON",
        help="a JSON object merged into the generated local config",
    )
    p.add_argument(
        "--relay-nice",
        type=int,
        default=-10,
        help="the relays' niceness increment [-10; ignored where not allowed]",
    )
    p.add_argument("--bits", type=int, default=3072, help="sockproxy RSA key size [3072]")
    p.add_argument("--markdown", action="store_true", help="print a README-ready table")
    p.add_argument("--no-install", action="store_true", help="skip missing peers, no apt-get")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (logs)")
    return p.parse_args(argv)


def available(systems: list[System], install: bool) -> list[System]:
    if install and any(system.missing() for system in systems):
        install_apt_peers()
    ready = []
    for system in systems:
        missing = system.missing()
        if missing:
            log(f"{system.key}: not installed ({missing}), skipped")
        else:
            ready.append(system)
    return ready


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on(signal.SIGTERM)
    meta = machine(args)
    systems = available([SYSTEMS[key] for key in args.peers], not args.no_install)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="sockproxy-wan-"))
    destination = Destination()
    ctx = Context(args, procs, tmp, destination)
    results: list[tuple[float, System, Figures]] = []
    code = 0
    try:
        for rtt_ms in args.rtt:
            for system in systems:
                log(f"===== {system.key} at RTT {rtt_ms:g} ms")
                results.append((rtt_ms, system, measure(ctx, system, rtt_ms)))
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        code = 130
    finally:
        procs.stop_all()
        destination.close()
        remove_tmp(tmp, args.keep_tmp)
    rows = table_rows(results, args)
    table = render_markdown(rows) if args.markdown else render_text(rows)
    print("\n".join(header(meta, args) + table + problems(results)))
    save(meta, results)
    if code == 0 and any(f.errors for _, s, f in results if s.key == "sockproxy"):
        code = 1
    return code


def save(meta: dict[str, Any], results: list[tuple[float, System, Figures]]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"wan-{stamp}.json"
    runs = [{"rtt_ms": rtt, "system": s.key, **asdict(f)} for rtt, s, f in results]
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1, default=str) + "\n")
    log(f"raw figures: {path}")


if __name__ == "__main__":
    sys.exit(main())
