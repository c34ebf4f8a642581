"""Files the programs trust (keys, config), read only if no one else could have changed them.

Like OpenSSH's ``StrictModes``: a key file or config file is refused when it is writable by
group or others, owned by another user (root aside), or sits in a folder that others may
write to (sticky folders such as ``/tmp`` aside: there only a file's owner can rename or
delete it). Every folder up to ``/`` is checked, as sshd does. Each refusal is one
``ConfigError`` line naming the file and the command that fixes it.

Where owners and mode bits do not decide access (Windows: ACLs do), nothing is checked and
a note says so once per file.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from pathlib import Path

from utils.errors import ConfigError
from utils.platform_support import O_BINARY, O_NONBLOCK, effective_uid, has_posix_permissions

__all__ = ["check_folders", "check_owner_and_mode", "read_trusted_file"]

log = logging.getLogger("sockproxy")

_GROUP_OTHER_READ = 0o055  # group/other bits but the write bits: r and x
_GROUP_OTHER_WRITE = 0o022


def read_trusted_file(path: Path, what: str, max_size: int, *, secret: bool = False) -> bytes:
    """The bytes of ``path`` after the StrictModes checks; ``secret``: owner-only reading too.

    The checks look at the file we opened (``fstat``), not at what the path names later.
    """
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang us; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | O_NONBLOCK | O_BINARY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        check_owner_and_mode(path, info, what, secret=secret)
        check_folders(path, what)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(max_size + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > max_size:
        raise ConfigError(f"{path}: too large for a {what} (at most {max_size} bytes)")
    return data


def check_owner_and_mode(path: Path, info: os.stat_result, what: str, *, secret: bool) -> None:
    """Refuse a file others may read (``secret``) or write, or that another user owns."""
    uid = effective_uid()
    if uid is None:
        _note_unchecked(str(path), what)
        return
    mode = stat.S_IMODE(info.st_mode)
    if secret and mode & _GROUP_OTHER_READ:
        raise ConfigError(
            f"{path}: {what} is readable by group/others (mode {mode:04o}); run chmod 600 {path}"
        )
    if mode & _GROUP_OTHER_WRITE:
        raise ConfigError(
            f"{path}: {what} is writable by group/others (mode {mode:04o}); run chmod go-w {path}"
        )
    if info.st_uid not in (uid, 0):
        raise ConfigError(
            f"{path}: {what} is owned by another user (uid {info.st_uid}); run chown {uid} {path}"
        )


def check_folders(path: Path, what: str) -> None:
    """Refuse a file in a folder (any level up to ``/``) that others may write and is not sticky."""
    if not has_posix_permissions():
        return
    for folder in Path(os.path.realpath(path)).parents:
        try:
            mode = os.stat(folder).st_mode
        except OSError as exc:
            raise ConfigError(f"{path}: cannot check folder {folder}: {exc.strerror}") from None
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise ConfigError(
                f"{path}: {what} is in a folder writable by others "
                f"({folder}, mode {stat.S_IMODE(mode):04o}); run chmod o-w {folder}"
            )


@functools.lru_cache(maxsize=64)  # one note per file, not one per reload
def _note_unchecked(path: str, what: str) -> None:
    log.info(
        "%s: %s permissions not checked: this platform uses ACLs, not mode bits; "
        "make sure only you can change it",
        path,
        what,
    )
