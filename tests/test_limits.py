"""server/limits.py: what one key may hold at once (issue 12, item 3)."""

from __future__ import annotations

import socket
import threading

from server.limits import KeyLimits, TunnelLimits
from tests.conftest import Launcher, TCPServer, socks_request, wait_for
from tests.test_features import _associate
from utils.socks5 import CMD_UDP_ASSOCIATE, Reply


def test_key_limits_count_per_name() -> None:
    limits = KeyLimits(2)
    assert limits.acquire("alice") and limits.acquire("alice")
    assert not limits.acquire("alice")
    assert limits.acquire("bob")  # another key is not affected
    limits.release("alice")
    assert limits.acquire("alice")
    for _ in range(2):
        limits.release("alice")
    assert limits.held("alice") == 0 and "alice" not in limits._held  # no memory kept


def test_key_limits_are_exact_under_threads() -> None:
    limits = KeyLimits(50)
    granted: list[bool] = []
    threads = [
        threading.Thread(target=lambda: granted.append(limits.acquire("k"))) for _ in range(200)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert granted.count(True) == 50 and limits.held("k") == 50


def test_tunnel_limits_udp_counts_twice_and_refusal_counts_nothing() -> None:
    limits = TunnelLimits(connections=3, udp_associations=1)
    assert limits.admit("k", udp=True) is None
    assert limits.admit("k", udp=True) == "max_udp_associations_per_key"
    assert limits.connections.held("k") == 1  # the refused association took nothing
    assert limits.admit("k", udp=False) is None and limits.admit("k", udp=False) is None
    assert limits.admit("k", udp=False) == "max_connections_per_key"
    limits.release("k", udp=True)
    assert limits.admit("k", udp=True) is None


def test_server_refuses_tunnels_past_the_keys_limits_and_names_the_key(
    launcher: Launcher, echo_server: TCPServer
) -> None:
    server, local = launcher.pair(
        server={"max_connections_per_key": 3, "max_udp_associations_per_key": 1}
    )
    held: list[socket.socket] = []
    try:
        control, _ = _associate(local.port)
        held.append(control)
        second = socks_request(local.port, "0.0.0.0", 0, command=CMD_UDP_ASSOCIATE)
        held.append(second.sock)
        assert second.reply == Reply.GENERAL_FAILURE
        for _ in range(2):
            ok = socks_request(local.port, "127.0.0.1", echo_server.port)
            held.append(ok.sock)
            assert ok.reply == Reply.SUCCEEDED
        over = socks_request(local.port, "127.0.0.1", echo_server.port)
        held.append(over.sock)
        assert over.reply == Reply.GENERAL_FAILURE
        log = server.stderr()
        assert "refused a tunnel of key local_public: max_udp_associations_per_key reached" in log
        assert "refused a tunnel of key local_public: max_connections_per_key reached" in log
        control.close()  # the association ends: its slots come back

        def slot_back() -> bool:
            again = socks_request(local.port, "127.0.0.1", echo_server.port)
            held.append(again.sock)
            return again.reply == Reply.SUCCEEDED

        assert wait_for(slot_back, timeout=10, step=0.2)
    finally:
        for sock in held:
            sock.close()
