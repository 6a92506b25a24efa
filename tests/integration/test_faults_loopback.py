"""The daemon killed with SIGKILL mid-transfer and started again, in Tailscale mode on the loopback
test tailnet: the transfer in flight fails with a clear error (never hangs), the stale IPC socket
is cleaned up so `up` works, the node keeps its identity, and transfers work again."""

import os
import signal

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import BackgroundCurl as Curl, eventually, peer_status
from tsproxy.daemon import ipc, statedir
from tsproxy.testing.servers import pattern_sha256

pytestmark = [pytest.mark.timeout(300)]
MB = 1_000_000


@pytest.fixture
def server_node(tailnet, web, tmp_path):
    b = Daemon(str(tmp_path / "b"), ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                                     "--hostname", "tsp-kb", "--listen", "off", "--non-tailnet", "refuse",
                                     "--reverse", f"8080:127.0.0.1:{web}"])
    try:
        yield b.start(timeout=60)
    finally:
        b.stop()


def fetch_exact(port: int, url: str, size: int, timeout: float = 30) -> bool:
    c = Curl(port, url, timeout)
    rc, _ = c.wait(timeout + 10)
    return rc == 0 and c.n == size and c.h.hexdigest() == pattern_sha256(size)


def test_daemon_sigkilled_mid_transfer_restarts_with_same_identity(tailnet, server_node, tmp_path):
    state, port = str(tmp_path / "a"), free_port()
    args = ["--login-server", tailnet.control_url, "--hostname", "tsp-ka", "--listen", f"127.0.0.1:{port}",
            "--non-tailnet", "refuse"]
    a = Daemon(state, [*args, "--auth-key", tailnet.auth_key]).start(timeout=60)
    a2 = None
    try:
        url = "http://tsp-kb:8080"
        eventually(lambda: fetch_exact(port, f"{url}/bytes/1000", 1000, 10), 30, "tsp-ka reaches tsp-kb")
        before = a.status()["self"]
        size = 8 * MB
        c = Curl(port, f"{url}/drip/{size}/8", 60)
        eventually(lambda: c.n >= MB, 30, "1 MB of the transfer arrived before the kill")
        os.kill(a.proc.pid, signal.SIGKILL)
        assert a.proc.wait(10) == -signal.SIGKILL
        rc, err = c.wait(30)                      # the proxy's socket died with it: curl says so
        assert rc not in (0, 28) and err.strip() and c.n < size, (rc, err, c.n)

        sock = statedir.socket_path(state)
        assert os.path.exists(sock), "SIGKILL leaves the IPC socket behind (the case under test)"
        with pytest.raises((ipc.DaemonNotRunning, OSError)):
            ipc.call(sock, {"op": "status"})

        a2 = Daemon(state, args).start(timeout=60)          # no auth key: the stored identity
        again = a2.status()["self"]
        assert again["node_key"] == before["node_key"] and again["addresses"] == before["addresses"]
        assert tailnet.auth_key not in a2.log()
        eventually(lambda: fetch_exact(port, f"{url}/bytes/{2 * MB}", 2 * MB, 30), 60,
                   "a transfer through the restarted daemon")
        kb = server_node.status()["peers"]
        assert [p["name"] for p in kb].count("tsp-ka") == 1, kb   # the same node, not a second one
        assert peer_status(server_node, "tsp-ka")["addresses"] == before["addresses"]
    finally:
        if a2 is not None:
            assert a2.stop() == 0
        a.stop()
