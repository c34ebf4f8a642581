"""The one exception hierarchy of sockproxy.

Every error the programs raise on purpose derives from ``SockproxyError``, so a
handler can tell "the peer or the user did something wrong" from a bug.
"""

from __future__ import annotations


class SockproxyError(Exception):
    """Base of every error sockproxy raises on purpose."""


class ConfigError(SockproxyError):
    """A config file, a field in it or a key file it names is wrong.

    The message is one line that names the file and the field; the entry points
    print it and exit with code 2.
    """


class ProtocolError(SockproxyError):
    """A peer sent bytes that do not follow the protocol."""


class Socks5Error(ProtocolError):
    """A SOCKS5 client broke RFC 1928/1929.

    ``reply`` is the RFC 1928 REP code to answer with, or None when the only
    correct answer is to close (for example a bad greeting).
    """

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class AuthenticationError(SockproxyError):
    """A peer failed to prove who it is (bad password, key, signature or MAC)."""


class ChannelError(ProtocolError):
    """The encrypted channel failed: a record did not authenticate, or it ended early."""
