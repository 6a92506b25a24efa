"""tsproxy daemons against the test control server driven into what real control planes do
(issue 16): an exit node in the tailnet, Headscale's answers to a bad key, key expiry by an
admin, lite updates that fail, PingRequests, 429 with Retry-After."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status

pytestmark = [pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def tailnet():
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host="127.0.0.1") as net:
        yield net


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"direct from loopback\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def loopback_web():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def test_exit_node_peer_changes_nothing_for_non_tailnet_destinations(tailnet, loopback_web,
                                                                     tmp_path):
    exit_d = Daemon(str(tmp_path / "x"), ["--login-server", tailnet.control_url, "--auth-key",
                                          tailnet.auth_key, "--hostname", "exit-x",
                                          "--listen", "off", "--non-tailnet", "refuse"])
    port = free_port()
    a = Daemon(str(tmp_path / "a"), ["--login-server", tailnet.control_url, "--auth-key",
                                     tailnet.auth_key, "--hostname", "client-a",
                                     "--listen", f"127.0.0.1:{port}", "--non-tailnet", "direct"])
    try:
        exit_d.start(timeout=60)
        a.start(timeout=60)
        x = tailnet.node("exit-x")
        tailnet.call(tailnet.control.set_exit_node, x.id)
        p = eventually(lambda: (lambda p: p if p and "0.0.0.0/0" in p["allowed_ips"] else None)(
            peer_status(a, "exit-x")), 30, "exit-x's /0 in client-a's netmap")
        assert "::/0" in p["allowed_ips"]
        # the WireGuard peer has the node's own addresses and nothing more
        assert sorted(p["routes"]) == sorted([f"{x.ipv4}/32", f"{x.ipv6}/128"]), p
        before = a.counters()
        r = subprocess.run(["curl", "-sS", "--max-time", "20", "--socks5-hostname",
                            f"127.0.0.1:{port}", f"http://127.0.0.1:{loopback_web}/"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout == "direct from loopback\n", r.stderr
        after = a.counters()
        key = next(k for k in after if k.endswith("dial_direct"))
        assert after[key] == before.get(key, 0) + 1
        tun = next(k for k in after if k.endswith("dial_tunnel"))
        assert after[tun] == before.get(tun, 0)
    finally:
        a.stop()
        exit_d.stop()
