"""What server.py and local.py share as programs: arguments, logging, signals, exit codes.

Exit codes: 0 after SIGINT/SIGTERM (and SIGBREAK, Ctrl-Break on Windows), 2 for a config
error (one line, no traceback), 1 when the listening socket cannot be opened.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

from utils.base import THREAD_STACK_SIZE, ProxyServer, format_peer
from utils.config import LocalConfig, ServerConfig
from utils.errors import ConfigError
from utils.listening import listen_failure
from utils.platform_support import (
    FD_RESERVE,
    FDS_PER_CONNECTION,
    connections_for_fd_limit,
    open_file_limit,
    optional_signal,
    raise_open_file_limit,
    stop_signals,
)
from utils.workers import WORKERS

VERSION = "2.0.0"  # the wire is protocol version 2 (docs/PROTOCOL.md)
EXIT_CONFIG = 2
EXIT_RUNTIME = 1

log = logging.getLogger("sockproxy")


def parse_args(
    prog: str, description: str, default_config: str, argv: list[str] | None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        default=default_config,
        type=Path,
        help=f"config file (default: {default_config})",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO)",
    )
    parser.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="read the private key's passphrase from this environment variable",
    )
    parser.add_argument(
        "--passphrase-prompt", action="store_true", help="ask for the private key's passphrase"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and keys, print a summary line and exit (0 ok, 2 error)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    return parser.parse_args(argv)


def setup_logging(level: str) -> None:
    # Every connection logs an access line on each side: skip what each LogRecord would
    # look up and the format never prints (the caller's frame, thread, process), as the
    # logging HOWTO's "Optimization" section suggests.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def read_passphrase(args: argparse.Namespace) -> bytes | None:
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise ConfigError(
                f"--passphrase-env: environment variable {args.passphrase_env} is not set"
            )
        return value.encode()
    if args.passphrase_prompt:
        return getpass.getpass("private key passphrase: ").encode()
    return None


ConfigT = TypeVar("ConfigT", LocalConfig, ServerConfig)


def within_fd_limit(config: ConfigT) -> ConfigT:
    """``config`` with ``max_connections`` lowered (and logged) to what open files allow."""
    limit = open_file_limit()
    allowed = connections_for_fd_limit(config.max_connections, limit)
    if allowed == config.max_connections:
        return config
    log.warning(
        "max_connections lowered from %d to %d: the open-file limit is %s "
        "(%d per connection plus %d); raise it with ulimit -n",
        config.max_connections,
        allowed,
        limit,
        FDS_PER_CONNECTION,
        FD_RESERVE,
    )
    return dataclasses.replace(config, max_connections=allowed)


def run(
    args: argparse.Namespace,
    build: Callable[[bytes | None], ProxyServer],
    on_reload: Callable[[ProxyServer], None] | None = None,
) -> int:
    """Load the config, listen, serve until SIGINT/SIGTERM; map failures to exit codes."""
    setup_logging(args.log_level)
    threading.stack_size(THREAD_STACK_SIZE)
    raise_open_file_limit()  # before the config: within_fd_limit reads the raised limit
    try:
        server = build(read_passphrase(args))
    except ConfigError as exc:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: config error: {exc}\n")
        return EXIT_CONFIG
    except OSError as exc:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: {listen_failure(exc)}\n")
        return EXIT_RUNTIME
    return serve(server, on_reload)


def _log_summary(server: ProxyServer) -> None:
    for line in server.summary():
        log.info("%s", line)


#: How long the main thread waits for a signal at a time: a wait without a timeout is not
#: interrupted by Ctrl-C on Windows (Python 3.11-3.13), so the handler would never run.
SIGNAL_POLL = 0.25


def serve(server: ProxyServer, on_reload: Callable[[ProxyServer], None] | None) -> int:
    """Serve until SIGINT/SIGTERM/SIGBREAK (and SIGHUP on the local, which has nothing to reload).

    Signal handlers only queue what to do; the main thread does it, so a second signal can
    never interrupt a reload or a summary that holds a lock. Signals the platform lacks
    (SIGHUP and SIGUSR1 on Windows) are simply not handled.
    """
    requests: queue.SimpleQueue[int] = queue.SimpleQueue()

    def queue_signal(signum: int, _frame: FrameType | None) -> None:
        requests.put(signum)

    summary, reload = optional_signal("SIGUSR1"), optional_signal("SIGHUP")
    for handled in (*stop_signals(), summary, reload):
        if handled is not None:
            signal.signal(handled, queue_signal)
    WORKERS.prestart()
    loop = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    loop.start()
    log.info("listening on %s", format_peer(server.server_address))
    while True:
        signum = _next_signal(requests)
        if signum == summary:
            _log_summary(server)
        elif signum == reload and on_reload is not None:
            on_reload(server)
        else:
            log.info("%s: shutting down", signal.Signals(signum).name)
            break
    server.shutdown()
    server.server_close()
    server.abort_all("shutting down")
    return 0


def _next_signal(requests: queue.SimpleQueue[int]) -> int:
    """The next queued signal, waiting in short slices so that Ctrl-C is seen everywhere."""
    while True:
        try:
            return requests.get(timeout=SIGNAL_POLL)
        except queue.Empty:
            continue
