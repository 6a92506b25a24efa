"""Faults with a transfer in flight, plain WireGuard mode against a real wireguard-go peer: every
transfer completes byte-exact or fails with a clear error, never hangs, and nothing leaks.

Covered elsewhere (not repeated here): DERP restart and direct path blackholed against a Go node
(tests/interop/test_tailscale_liveness.py; WireGuard mode has no DERP to fall back to, so its
blackhole is an outage the transfer must ride out, below), control server restart (tests/integration/
test_tailnet_daemons.py), plain loss (tests/interop/test_wg_mode.py), daemon SIGKILL and restart
(tests/integration/test_faults_loopback.py)."""

import os
import re
import socket
import struct
import sys
import json

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import BackgroundCurl as Curl, eventually
from tsproxy.daemon import ipc, statedir
from tsproxy.keys import NodePrivate
from tsproxy.testing.servers import pattern_sha256
from tsproxy.testing.wgpeer import PEER_IP4, WG_PORT

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

MB = 1_000_000
_ips = iter(range(200, 250))


def daemon_for(wg_peer, tmp_path, endpoint: str | None = None) -> Daemon:
    """A daemon with its own key and tunnel address (two daemons sharing a key steal the peer's
    session from each other), SOCKS5/HTTP on a free loopback port, `--non-tailnet refuse`."""
    key, n = NodePrivate.generate(), next(_ips)
    ip4, ip6 = f"100.64.0.{n}", f"fd7a:115c:a1e0::{n:x}"
    wg_peer.add_client(key.public().b64(), ip4, ip6)
    text = wg_peer.client_conf().replace(f"PrivateKey = {wg_peer.client_key.b64()}", f"PrivateKey = {key.b64()}")
    text = re.sub(r"Address = .*", f"Address = {ip4}/32, {ip6}/128", text)
    if endpoint:
        text = text.replace(f"Endpoint = {wg_peer.endpoint}", f"Endpoint = {endpoint}")
    conf = tmp_path / "client.conf"
    conf.write_text(text)
    os.chmod(conf, 0o600)
    port = free_port()
    d = Daemon(str(tmp_path / "state"), ["--wg-config", str(conf), "--listen", f"127.0.0.1:{port}",
                                         "--non-tailnet", "refuse"]).start()
    d.proxy_port = port
    return d


def get_ok(port: int, path: str, size: int, timeout: float = 10) -> bool:
    c = Curl(port, f"http://{PEER_IP4}{path}", timeout)
    rc, _ = c.wait(timeout + 10)
    return rc == 0 and c.n == size and c.h.hexdigest() == pattern_sha256(size)


def assert_exact_or_clear_error(c: Curl, size: int, rc: int, err: str) -> str:
    """Completed byte-exact, or failed with curl's own error (never its timeout: that is a hang)."""
    if rc == 0:
        assert (c.n, c.h.hexdigest()) == (size, pattern_sha256(size)), "completed but not byte-exact"
        return "completed"
    assert rc != 28, f"transfer timed out (a hang) after {c.n} bytes: {err}"
    assert err.strip() and c.n < size, (rc, err, c.n)
    return f"failed: {err.strip()}"


@pytest.mark.parametrize("probe", ["new-connections-during-recovery", "in-flight-alone"])
def test_wireguard_go_killed_and_restarted_mid_transfer(wg_peer, tmp_path, probe):
    """`in-flight-alone`: nothing but the interrupted transfer may trigger our re-handshake."""
    d = daemon_for(wg_peer, tmp_path)
    try:
        assert get_ok(d.proxy_port, "/bytes/1000", 1000)
        size = 8 * MB
        c = Curl(d.proxy_port, f"http://{PEER_IP4}/drip/{size}/8", 120)
        eventually(lambda: c.n >= MB, 30, "1 MB of the transfer arrived before the fault")
        handshakes = d.status()["peers"][0]["handshakes"]
        wg_peer.restart_wireguard()           # new process: sessions and our endpoint forgotten
        if probe == "in-flight-alone":
            rc, err = c.wait(150)
        # new connections work again within seconds (our side handshakes with the new process)
        eventually(lambda: get_ok(d.proxy_port, "/bytes/100000", 100000, timeout=5), 60,
                   "a new connection through the restarted peer")
        assert d.status()["peers"][0]["handshakes"] > handshakes
        if probe != "in-flight-alone":
            rc, err = c.wait(150)
        outcome = assert_exact_or_clear_error(c, size, rc, err)
        print(f"in-flight transfer across the wireguard-go restart ({probe}): {outcome}")
        assert get_ok(d.proxy_port, f"/bytes/{2 * MB}", 2 * MB, timeout=60)
    finally:
        assert d.stop() == 0


def test_path_blackholed_then_restored_mid_transfer(wg_peer, tmp_path):
    """WireGuard mode's form of the blackholed path: no DERP to fall back to, so the transfer
    must survive the outage (RTO backoff, handshake retries) and resume, or fail clearly."""
    from tsproxy.testing import impair
    d = daemon_for(wg_peer, tmp_path)
    try:
        assert get_ok(d.proxy_port, "/bytes/1000", 1000)
        size = 8 * MB
        c = Curl(d.proxy_port, f"http://{PEER_IP4}/drip/{size}/8", 120)
        eventually(lambda: c.n >= MB, 30, "1 MB of the transfer arrived before the fault")
        client_ip = d.status()["addresses"][0]
        impair.set_loss(wg_peer, 1000, WG_PORT)         # every WireGuard datagram dropped
        try:
            # an outage, not a blip: the server's TCP backs off its retransmission timer 4 times
            eventually(lambda: _server_backoff(wg_peer, client_ip) >= 4, 60,
                       "the server's retransmissions back off in the blackhole")
            assert impair.loss_counters(wg_peer) > 0
        finally:
            impair.clear_loss(wg_peer)
        rc, err = c.wait(150)
        outcome = assert_exact_or_clear_error(c, size, rc, err)
        print(f"in-flight transfer across the blackhole: {outcome}")
        assert get_ok(d.proxy_port, f"/bytes/{2 * MB}", 2 * MB, timeout=60)
    finally:
        assert d.stop() == 0


@pytest.fixture
def impair_relay(wg_peer, tmp_path):
    """The udp_impair relay in the peer namespace: 5% loss, 5% duplication, 5% reordering."""
    port = free_port()
    stats = str(tmp_path / "impair-stats.json")
    proc = wg_peer.ns.spawn([sys.executable, "-m", "tsproxy.testing.udp_impair",
                             "--listen", f"{wg_peer.veth_ip}:{port}", "--target", f"{wg_peer.veth_ip}:{WG_PORT}",
                             "--loss", "0.05", "--duplicate", "0.05", "--reorder", "0.05", "--stats", stats],
                            str(tmp_path / "impair.log"), env={"PYTHONPATH": REPO})
    try:
        eventually(lambda: os.path.exists(stats) or proc.poll() is not None, 15, "impair relay ready")
        assert proc.poll() is None, open(tmp_path / "impair.log").read()
        yield f"{wg_peer.veth_ip}:{port}", stats
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait(10)


def test_loss_reorder_and_duplication_transfer_byte_exact(wg_peer, impair_relay, tmp_path):
    endpoint, stats = impair_relay
    d = daemon_for(wg_peer, tmp_path, endpoint=endpoint)
    try:
        size = 5 * MB
        c = Curl(d.proxy_port, f"http://{PEER_IP4}/bytes/{size}", 180)
        rc, err = c.wait(200)
        assert rc == 0, err
        assert (c.n, c.h.hexdigest()) == (size, pattern_sha256(size))
        counts = eventually(lambda: (s := json.load(open(stats)))["up_in"] > 100 and s, 5, "relay stats")
        for direction in ("up", "down"):
            for what in ("dropped", "duplicated", "reordered"):
                assert counts[f"{direction}_{what}"] > 0, counts
        print(f"impair relay: {counts}")
    finally:
        assert d.stop() == 0


def _socks5_connect(port: int, host: str, dport: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", dport))
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        assert chunk, "SOCKS5 reply cut short"
        reply += chunk
    assert reply[1] == 0, reply
    return s


def _server_conns(wg_peer, client_ip: str) -> int:
    """Connections the HTTP server in the peer namespace still holds from `client_ip`."""
    out = wg_peer.exec(["ss", "-Htn", "state", "all", "sport", "=", ":80", "dst", client_ip]).stdout
    return sum(1 for line in out.splitlines() if line.split() and line.split()[0] not in ("LISTEN", "TIME-WAIT"))


def _server_backoff(wg_peer, client_ip: str) -> int:
    """The RTO backoff of the server's connection to `client_ip` (ss -ti `backoff:N`)."""
    out = wg_peer.exec(["ss", "-Htni", "state", "established", "sport", "=", ":80", "dst", client_ip]).stdout
    return max((int(m) for m in re.findall(r"backoff:(\d+)", out)), default=0)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tcp_conns(d: Daemon) -> int:
    """The daemon's open tunnel TCP connections (TIME-WAIT ends by itself after 2 MSL)."""
    conns = ipc.call(statedir.socket_path(d.state_dir), {"op": "debug.tcp"})["connections"]
    return sum(1 for c in conns if c["state"] != "TIME-WAIT")


def test_local_client_vanishing_mid_transfer_closes_remote_and_leaks_nothing(wg_peer, tmp_path):
    d = daemon_for(wg_peer, tmp_path)
    try:
        assert get_ok(d.proxy_port, "/bytes/1000", 1000)
        client_ip = d.status()["addresses"][0]
        eventually(lambda: _server_conns(wg_peer, client_ip) == 0 and _tcp_conns(d) == 0, 30,
                   "no connection left from the warm-up")
        base_fds = _fds(d.proc.pid)
        for _ in range(3):
            s = _socks5_connect(d.proxy_port, PEER_IP4, 80)
            s.sendall(f"GET /bytes/{500 * MB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            got = 0
            while got < MB:
                chunk = s.recv(1 << 16)
                assert chunk, "transfer ended early"
                got += len(chunk)
            assert _server_conns(wg_peer, client_ip) == 1 and _tcp_conns(d) == 1
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()                        # RST: the client vanished mid-transfer
            eventually(lambda: _server_conns(wg_peer, client_ip) == 0, 30,
                       "the server in the peer namespace sees its connection end")
            eventually(lambda: _tcp_conns(d) == 0, 30, "the daemon's tunnel connection is gone")
            eventually(lambda: _fds(d.proc.pid) <= base_fds, 30, f"daemon fds back to {base_fds}")
        assert get_ok(d.proxy_port, f"/bytes/{MB}", MB)     # the daemon still serves
    finally:
        assert d.stop() == 0
