"""The real tailscaled (1.96.4) against the test control server's Headscale profile, over
HTTPS: it registers at capability version 133 (Headscale refuses < 113), its disco key reaches
the server only through its lite endpoint update, and it relays through the embedded DERP
served on the control listener at /derp (published as Headscale's GenerateRegion does, from
the server URL) with UDP blocked, to a tsproxy reverse forward."""

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, path_of, peer_status, start_page_server
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(300)]
PAGE = "hello from tsp-b\n"


@pytest.fixture(scope="module")
def hs_net(go_ns):
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host=go_ns.root_ip, profile="headscale", tls=True,
                     embedded_derp="server_url") as net:
        yield net


def test_tailscaled_registers_and_relays_through_the_embedded_derp(go_ns, hs_net, tmp_path):
    require("tailscaled", "tailscale", "curl", "nft", "setpriv")
    from tsproxy.testing.tailscaled import Tailscaled
    from tsproxy.testing.tsgo import block_udp, unblock_udp
    net = hs_net
    region = net.control.derp_map["Regions"]["999"]["Nodes"][0]
    assert (region["HostName"], region["DERPPort"]) == (go_ns.root_ip, net.control.port)
    web = start_page_server()
    tsp = Daemon(str(tmp_path / "tsp"), [
        "--login-server", net.control_url, "--auth-key", net.auth_key, "--control-ca-file",
        net.ca_file, "--hostname", "tsp-hs", "--listen", f"127.0.0.1:{free_port()}",
        "--reverse", f"8080:127.0.0.1:{web.server_address[1]}"])
    tsd = Tailscaled(go_ns, control_url=net.control_url, auth_key=net.auth_key,
                     hostname="tsd-hs", ca_file=net.ca_file, socks_port=1057)
    block_udp(go_ns)
    try:
        tsp.start(timeout=60)
        tsd.start()
        n = tsd.join(net)
        assert n.cap >= 133 and n.home_derp == 999
        maps = net.call(lambda: [r for kind, r in net.control.registry.log if kind == "map"
                                 and r.get("NodeKey") == n.node_key])
        assert maps and all(not m.get("Stream") for m in maps)   # lite updates only
        assert net.call(lambda: net.control.counters.get("version_refused", 0)) == 0
        me = tsp.status()["addresses"][0]
        eventually(lambda: tsd.curl(f"http://{me}:8080/", timeout=10).stdout == PAGE, 90,
                   "tailscaled -> tsproxy over the embedded DERP")
        assert path_of(tsp, "tsd-hs").startswith("derp"), peer_status(tsp, "tsd-hs")
        assert net.call(lambda: net.control.embedded_derp.counters["packets_forwarded"]) > 0
        assert "tlsdial: error" not in tsd.log()
    finally:
        unblock_udp(go_ns)
        tsd.stop()
        tsp.stop()
        web.shutdown()
