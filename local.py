#!/usr/bin/env python3
"""sockproxy local: a SOCKS5 proxy for your browser that tunnels everything to the server."""

from __future__ import annotations

import sys

from client.handler import LocalServer
from utils.cli import parse_args, run, within_fd_limit
from utils.config import load_local_config


def main(argv: list[str] | None = None) -> int:
    args = parse_args("local.py", __doc__ or "", "local_config.json", argv)

    def build(passphrase: bytes | None) -> LocalServer:
        return LocalServer(within_fd_limit(load_local_config(args.config, passphrase)))

    return run(args, build)


if __name__ == "__main__":
    sys.exit(main())
