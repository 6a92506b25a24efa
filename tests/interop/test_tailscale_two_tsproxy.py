"""Two tsproxy nodes on the test tailnet: with the UDP between their fixed ports dropped
(nftables, root namespace) they reach each other through the DERP relay only; with it allowed,
disco proves a direct path and the status shows it."""

import subprocess
import time

import pytest

from tests.conftest import Daemon, free_port
from tests.integration.test_tailnet_daemons import _Web  # noqa: F401  (the same page server)
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(300)]
TABLE = "tsp_two_nodes_block"


def block(p1, p2):
    rules = (f"table inet {TABLE} {{\n chain i {{ type filter hook input priority 0;\n"
             f"  udp sport {p1} udp dport {p2} drop;\n  udp sport {p2} udp dport {p1} drop;\n }}\n}}\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)


def unblock():
    subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True)


def path_of(d, name):
    for p in d.status()["peers"]:
        if p["name"] == name:
            return p["path"] or ""
    return ""


def curl(port, url, *extra):
    return subprocess.run(["curl", "-sS", "--max-time", "10", *extra, "--socks5-hostname",
                           f"127.0.0.1:{port}", url], capture_output=True, text=True)


def test_derp_only_then_direct(tmp_path):
    require("nft", "curl")
    import http.server
    import threading

    from tsproxy.testing.tailnet import TestTailnet
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    pa, pb, socks = free_port(), free_port(), free_port()
    block(pa, pb)
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
            unblock()
            deadline = time.monotonic() + 60
            while not path_of(a, "tsp-b").startswith("direct"):
                assert time.monotonic() < deadline, path_of(a, "tsp-b")
                curl(socks, "http://tsp-b:8080/")
                time.sleep(0.3)
            assert path_of(b, "tsp-a").startswith("direct")
            assert curl(socks, "http://tsp-b:8080/").stdout == "hello from tsp-b\n"
    finally:
        unblock()
        for d in daemons:
            d.stop()
        srv.shutdown()
