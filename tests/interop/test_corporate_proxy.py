"""Corporate network (issue 16 defect 7): a tsproxy daemon in a namespace whose only way out is
an HTTP CONNECT proxy (nft drops every other packet to the servers' host) reaches the control
server and the DERP relay through HTTP_PROXY/HTTPS_PROXY with credentials, and carries traffic
to a peer over DERP.  The proxy, control and DERP servers run on the root side of the veth."""

import os
import sys
import time

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status, start_page_server
from tsproxy.daemon import ipc, statedir
from tsproxy.testing.connect_proxy import TestConnectProxy
from tsproxy.testing.peers import find_binary, require

pytestmark = [pytest.mark.timeout(300)]
SECRET = "pr0xy-s3cret"


@pytest.fixture
def net():
    require("nft", "curl")
    from tsproxy.testing.netns import Namespace
    from tsproxy.testing.tailnet import TestTailnet
    ns = Namespace("tspx")
    try:
        _, _, root_ip, _ = ns.veth_to_root()
        with TestTailnet(host=str(root_ip)) as tn:
            proxy = TestConnectProxy(host=str(root_ip), credentials=("corp-user", SECRET))
            tn.run(proxy.start())
            # inside the namespace only the proxy port of the root side is reachable
            ns.exec([find_binary("nft"), "-f", "-"], input=(
                "table inet tsp_proxy_only {\n chain o { type filter hook output priority 0;\n"
                f"  ip daddr {root_ip} tcp dport != {proxy.port} counter drop;\n"
                f"  ip daddr {root_ip} udp dport 0-65535 counter drop;\n }}\n}}\n"))
            try:
                yield ns, tn, proxy, str(root_ip)
            finally:
                tn.run(proxy.stop())
    finally:
        ns.close()


def _status(state):
    try:
        return ipc.call(statedir.socket_path(state), {"op": "status"})
    except (ipc.DaemonNotRunning, OSError, ValueError):
        return None


def test_daemon_behind_connect_proxy_reaches_control_and_derp(net, tmp_path):
    ns, tn, proxy, root_ip = net
    web = start_page_server()
    b = Daemon(str(tmp_path / "b"), ["--login-server", tn.control_url, "--auth-key", tn.auth_key,
                                      "--non-tailnet", "refuse", "--hostname", "tsp-b",
                                      "--listen", "off",
                                      "--reverse", f"8080:127.0.0.1:{web.server_address[1]}"])
    state = str(tmp_path / "a")
    os.makedirs(state, mode=0o700)
    a_port = free_port()
    log_path = os.path.join(state, "test-daemon.log")
    try:
        # the direct route really is closed from inside the namespace
        r = ns.exec(["curl", "-sS", "--max-time", "3", tn.control_url + "/key?v=130"],
                    check=False)
        assert r.returncode != 0
        b.start(timeout=60)
        env = {"HTTPS_PROXY": proxy.url_with_credentials,
               "HTTP_PROXY": proxy.url_with_credentials, "NO_PROXY": "", "PYTHONPATH": REPO}
        ns.spawn([sys.executable, "-m", "tsproxy", "up", "--foreground", "--state-dir", state,
                  "--login-server", tn.control_url, "--auth-key", tn.auth_key,
                  "--non-tailnet", "refuse", "--hostname", "tsp-a",
                  "--listen", f"127.0.0.1:{a_port}"], log_path=log_path, env=env)
        st = eventually(lambda: (lambda s: s if s and s.get("state") == "Running" else None)(
            _status(state)), 60, "tsp-a Running through the proxy")
        assert st["self"]["name"] == "tsp-a.tailnet.test"
        eventually(lambda: any(p["name"] == "tsp-b" for p in _status(state)["peers"]), 30,
                   "tsp-b in tsp-a's netmap")

        def fetch():
            r = ns.exec(["curl", "-sS", "--max-time", "10", "--socks5-hostname",
                         f"127.0.0.1:{a_port}", "http://tsp-b:8080/"], check=False)
            return r if r.returncode == 0 else None
        r = eventually(fetch, 60, "tsp-b reachable from behind the proxy")
        assert r.stdout == "hello from tsp-b\n"
        assert peer_status(b, "tsp-a")["path"].startswith("derp")
        control_port = tn.control.port
        derp_port = tn.derps[0].port
        assert proxy.connects[f"{root_ip}:{control_port}"] >= 2      # /key, then Noise
        assert proxy.connects[f"{root_ip}:{derp_port}"] >= 1
        assert set(proxy.connects) == {f"{root_ip}:{control_port}", f"{root_ip}:{derp_port}"}
        assert proxy.counters["auth_failed"] == 0
        with open(log_path, errors="replace") as f:
            text = f.read()
        assert SECRET not in text and "corp-user" not in text
    finally:
        ipc_down = statedir.socket_path(state)
        try:
            ipc.call(ipc_down, {"op": "down"})
        except (ipc.DaemonNotRunning, OSError):
            pass
        deadline = time.monotonic() + 15
        while ns.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        b.stop()
        web.shutdown()
