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
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import (
    SHIPPED_MAX_CONNECTIONS,
    Running,
    SockproxyOptions,
    microsocks_label,
    microsocks_missing,
    pproxy_label,
    pproxy_missing,
    ss_label,
    ss_missing,
    ssh_label,
    ssh_missing,
    start_microsocks,
    start_pproxy,
    start_sockproxy,
    start_ss,
    start_ssh,
)
from bench.procs import (
    STOP_TIMEOUT,
    PeerError,
    Processes,
    install_apt_peers,
    interrupt_on,
    log,
    remove_tmp,
    run_to_stderr,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOCKSBENCH = Path(__file__).resolve().parents[2] / "shared/bench/socksbench.py"
RESULTS_DIR = REPO / "bench" / "results"

PEERS = ("ssh", "ss", "pproxy", "microsocks", "direct")
PPROXY_REQUIREMENT = "pproxy==2.7.9"

# Targets, from the brief: sockproxy against the ssh aes256-gcm row.
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_CONNECT_P50_RATIO = 2.0
TARGET_CONNECT_P99_RATIO = 3.0
TARGET_RR_RATIO = 2.0
TARGET_BIG_WALL_S = 3.0
TARGET_BIG_RSS_MB = 150.0

Json = dict[str, Any]
NONE = "\u2013"  # an en dash: no figure


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


# --- sockproxy


def sockproxy_max_connections(args: argparse.Namespace) -> int:
    """The shipped 1024, unless a concurrency run asks for more than fits."""
    wanted = max(args.conns, args.conns_big)
    return SHIPPED_MAX_CONNECTIONS if wanted <= 1000 else wanted + 64


def start_sockproxy_peer(ctx: Context) -> Running:
    options = SockproxyOptions(max_connections=sockproxy_max_connections(ctx.args))
    pair = start_sockproxy(ctx.procs, ctx.tmp / "sockproxy", ctx.args.bits, options=options)
    return Running(
        pair.local_port,
        [pair.local.pid, pair.server.pid],
        [pair.local, pair.server],
        must_exit_zero=True,
    )


def _in_folder(
    start: Callable[[Processes, Path], Running], name: str
) -> Callable[[Context], Running]:
    """A peer's start function, in its own folder of the run's temporary folder."""
    return lambda ctx: start(ctx.procs, ctx.tmp / name)


def start_direct(_ctx: Context) -> Running:
    return Running(None, [], [])


SOCKPROXY = PeerSpec(
    "sockproxy",
    lambda args: f"**sockproxy** (RSA-{args.bits}, AES-256-GCM 64 B cells)",
    lambda: None,
    start_sockproxy_peer,
)
PEER_SPECS = {
    "ssh": PeerSpec("ssh", lambda _a: ssh_label(), ssh_missing, _in_folder(start_ssh, "ssh")),
    "ss": PeerSpec("ss", lambda _a: ss_label(), ss_missing, _in_folder(start_ss, "ss")),
    "pproxy": PeerSpec(
        "pproxy", lambda _a: pproxy_label(), pproxy_missing, _in_folder(start_pproxy, "pproxy")
    ),
    "microsocks": PeerSpec(
        "microsocks",
        lambda _a: microsocks_label(),
        microsocks_missing,
        _in_folder(start_microsocks, "microsocks"),
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
        if running.notes is not None:
            result.notes += running.notes()
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


def install_peers() -> None:
    install_apt_peers()
    if not run_to_stderr([sys.executable, "-m", "pip", "install", PPROXY_REQUIREMENT]):
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.socksbench.is_file():
        print(f"run.py: no socksbench at {args.socksbench} (use --socksbench)", file=sys.stderr)
        return 2
    interrupt_on(signal.SIGTERM, signal.SIGHUP)
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
        remove_tmp(tmp, args.keep_tmp)
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
