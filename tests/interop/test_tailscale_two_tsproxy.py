"""Two tsproxy nodes on the test tailnet: with the UDP between their fixed ports dropped
(nftables, root namespace) they reach each other through the DERP relay only; with it allowed,
disco proves a direct path and the status shows it."""

import time

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import path_of, socks_curl, start_page_server
from tsproxy.testing.impair import clear_udp_drop, drop_udp_between
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(300)]


def curl(port, url, *extra):
    return socks_curl(port, url, *extra, timeout=10)


def test_derp_only_then_direct(tmp_path):
    require("nft", "curl")
    from tsproxy.testing.tailnet import TestTailnet
    srv = start_page_server()
    pa, pb, socks = free_port(), free_port(), free_port()
    drop_udp_between(pa, pb)
    daemons = []
    try:
        with TestTailnet(host="127.0.0.1") as net:
            b = Daemon(str(tmp_path / "b"), [
                "--login-server", net.control_url, "--auth-key", net.auth_key, "--hostname",
                "tsp-b", "--listen", "off", "--port", str(pb),
                "--reverse", f"8080:127.0.0.1:{srv.server_address[1]}"]).start(timeout=60)
            daemons.append(b)
            a = Daemon(str(tmp_path / "a"), [
                "--login-server", net.control_url, "--auth-key", net.auth_key, "--hostname",
                "tsp-a", "--listen", f"127.0.0.1:{socks}", "--port", str(pa)]).start(timeout=60)
            daemons.append(a)
            deadline = time.monotonic() + 30
            while (r := curl(socks, "http://tsp-b:8080/")).stdout != "hello from tsp-b\n":
                assert time.monotonic() < deadline, r.stderr
                time.sleep(0.3)
            for _ in range(10):                     # disco keeps trying; it must not get through
                assert curl(socks, "http://tsp-b:8080/bytes/200000", "-o", "/dev/null").returncode == 0
                assert path_of(a, "tsp-b").startswith("derp"), path_of(a, "tsp-b")
            st = a.status()["magicsock"]
            assert st["counters"]["tx_derp"] > 0 and st["home_derp"] == 900
            clear_udp_drop()
            deadline = time.monotonic() + 60
            while not path_of(a, "tsp-b").startswith("direct"):
                assert time.monotonic() < deadline, path_of(a, "tsp-b")
                curl(socks, "http://tsp-b:8080/")
                time.sleep(0.3)
            assert path_of(b, "tsp-a").startswith("direct")
            assert curl(socks, "http://tsp-b:8080/").stdout == "hello from tsp-b\n"
    finally:
        clear_udp_drop()
        for d in daemons:
            d.stop()
        srv.shutdown()
