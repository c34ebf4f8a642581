"""Generate the RSA key pairs of sockproxy.

    python3 utils/genkey.py [--dir keys] [--bits 3072] [--force] [--name NAME]
                            [--passphrase-env VAR]
    python3 utils/genkey.py --export-public PRIVATE_KEY [--passphrase-env VAR]

Without ``--name`` it writes two independent pairs, ``local_*.pem`` and
``server_*.pem``. The server keeps ``server_private.pem`` and ``local_public.pem``;
the local side keeps ``local_private.pem`` and ``server_public.pem``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    from utils.errors import ConfigError
    from utils.keys import (
        MIN_BITS,
        fingerprint,
        generate_pair,
        load_private_key,
        pair_paths,
        public_key_file,
        write_pair,
    )
except ModuleNotFoundError as missing:
    from utils.requirements import exit_missing

    exit_missing(missing)

DEFAULT_BITS = 3072
DEFAULT_NAMES = ("local", "server")


def _bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if bits < MIN_BITS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_BITS}, got {bits}")
    return bits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genkey.py", description="Generate the RSA key pairs of sockproxy."
    )
    parser.add_argument("--dir", type=Path, default=Path("keys"), help="output folder (keys)")
    parser.add_argument("--bits", type=_bits, default=DEFAULT_BITS, help="RSA key size (3072)")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")
    parser.add_argument("--name", help="write only NAME_private.pem and NAME_public.pem")
    parser.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the private keys with the passphrase in environment variable VAR",
    )
    parser.add_argument(
        "--export-public",
        metavar="PRIVATE_KEY",
        type=Path,
        help="print the public key file of an existing private key (with its X25519 block)",
    )
    return parser


def _passphrase(var: str | None) -> bytes | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"environment variable {var} is not set or empty")
    return value.encode("utf-8")


def _prepare(directory: Path, names: tuple[str, ...], force: bool) -> None:
    """Refuse early (before the slow key generation) and create the folder (0700)."""
    for name in names:
        for path in pair_paths(directory, name):
            if not force and (path.exists() or path.is_symlink()):
                raise ConfigError(f"{path}: already exists; use --force to overwrite")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create the folder: {exc.strerror}") from None
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a folder")


def _run(args: argparse.Namespace) -> None:
    if args.export_public is not None:
        key = load_private_key(args.export_public, _passphrase(args.passphrase_env))
        sys.stdout.write(public_key_file(key).decode("ascii") + "\n")
        return
    names: tuple[str, ...] = (args.name,) if args.name is not None else DEFAULT_NAMES
    passphrase = _passphrase(args.passphrase_env)
    _prepare(args.dir, names, args.force)
    for name in names:
        key = generate_pair(args.bits)  # one fresh pair per name: never shared
        private_path, public_path = write_pair(args.dir, name, key, args.force, passphrase)
        print(f"wrote {private_path} (private key, mode 0600: keep it secret)")
        print(f"wrote {public_path} {fingerprint(key)}")
    if args.name is None:
        print(
            f"server side: {args.dir / 'server_private.pem'} and {args.dir / 'local_public.pem'}; "
            f"local side: {args.dir / 'local_private.pem'} and {args.dir / 'server_public.pem'}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the script; 0 on success, 2 on a usage or file error (one line on stderr)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage and the error
        return exc.code if isinstance(exc.code, int) else 2
    try:
        _run(args)
    except ConfigError as exc:
        print(f"genkey: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
