"""The interop fixtures themselves: a real kernel veth, a real wireguard-go peer with our
servers behind it (proved by sing-box, an independent WireGuard client), PID-based teardown."""

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest

from tsproxy.testing import impair, netns
from tsproxy.testing.peers import require
from tsproxy.testing.servers import pattern_sha256
from tsproxy.testing.singbox import MIXED_PORT, REF_IP4
from tsproxy.testing.wgpeer import DNS_NAME, PEER_IP4, PEER_IP6

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _assert_no_link(name):
    r = netns.run(["ip", "link", "show", name], check=False)
    assert (r.returncode, r.stderr.strip()) == (1, f'Device "{name}" does not exist.')


def test_kernel_sees_the_veth_and_pings_the_peer(wg_peer):
    link = netns.run(["ip", "-o", "addr", "show", "dev", wg_peer.root_if]).stdout
    assert f"{wg_peer.root_ip}/30" in link
    r = netns.run(["ping", "-c", "2", "-W", "2", "-i", "0.2", str(wg_peer.veth_ip)], check=False)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
    wg_peer.ns.assert_no_default_route()
    assert wg_peer.ns.name in netns.run(["ip", "netns", "list"]).stdout


def test_servers_answer_on_the_veth_address(wg_peer):
    ip = str(wg_peer.veth_ip)
    with socket.create_connection((ip, 80), timeout=10) as s:
        s.sendall(b"GET /bytes/1000000 HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    body = data.split(b"\r\n\r\n", 1)[1]
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(1_000_000)
    with socket.create_connection((ip, 7), timeout=10) as s:
        s.sendall(b"echo me")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"echo me"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"udp echo", (ip, 7))
        assert u.recvfrom(100)[0] == b"udp echo"
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"".join(
            bytes([len(p)]) + p.encode() for p in DNS_NAME.split(".")) + b"\x00\x00\x01\x00\x01"
        u.sendto(q, (ip, 53))
        reply = u.recvfrom(512)[0]
        assert struct.unpack_from("!HH", reply, 6)[0] == 1 and reply.endswith(bytes([100, 64, 0, 2]))


@pytest.mark.parametrize("addr", [PEER_IP4, f"[{PEER_IP6}]"])
def test_servers_listen_on_the_tunnel_addresses(wg_peer, addr):
    r = wg_peer.exec(["curl", "-sS", "--max-time", "5", f"http://{addr}/"], check=False)
    assert r.stdout == "hello from tsp-peer\n", r.stderr


def test_singbox_through_the_peer_fetches_root(wg_peer, singbox_client):
    r = singbox_client.ns.exec(["curl", "-sS", "--max-time", "10", "--socks5-hostname",
                                f"127.0.0.1:{MIXED_PORT}", f"http://{PEER_IP4}/"], check=False)
    assert r.stdout == "hello from tsp-peer\n", r.stderr
    r = singbox_client.ns.exec(["curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{size_download}",
                                "--socks5-hostname", f"127.0.0.1:{MIXED_PORT}", f"http://{PEER_IP4}/bytes/5000000"],
                               check=False)
    assert r.stdout == "5000000", r.stderr
    # The bytes really crossed wireguard-go: it has a handshake and counters for sing-box's key.
    peer = next(p for p in wg_peer.wg_dump() if p["public_key"] == singbox_client.key.public().b64())
    assert peer["latest_handshake"] > 0 and peer["tx"] > 5_000_000
    # ... and the peer's allowed-ips for that key are sing-box's tunnel address.
    dump = wg_peer.exec(["wg", "show", wg_peer.ifname, "allowed-ips"]).stdout
    assert f"{singbox_client.key.public().b64()}\t{REF_IP4}/32" in dump


def test_loss_impairment_drops_and_clears(wg_peer, singbox_client):
    require("nft")
    impair.set_loss(wg_peer, 500)
    try:
        for _ in range(3):
            singbox_client.ns.exec(["curl", "-s", "--max-time", "3", "--socks5-hostname",
                                    f"127.0.0.1:{MIXED_PORT}", f"http://{PEER_IP4}/bytes/200000",
                                    "-o", "/dev/null"], check=False)
        assert impair.loss_counters(wg_peer) > 0
    finally:
        impair.clear_loss(wg_peer)
    assert impair.loss_counters(wg_peer) == 0
    r = singbox_client.ns.exec(["curl", "-sS", "--max-time", "20", "--socks5-hostname",
                                f"127.0.0.1:{MIXED_PORT}", f"http://{PEER_IP4}/"], check=False)
    assert r.stdout == "hello from tsp-peer\n"


def test_namespace_teardown_stops_processes_by_pid(tmp_path):
    require()
    ns = netns.Namespace()
    name = ns.name
    try:
        root_if, _, _, _ = ns.veth_to_root()
        p = ns.spawn(["sleep", "300"], str(tmp_path / "sleep.log"))
        assert netns.alive(p.pid)
    finally:
        ns.close()
    assert not netns.alive(p.pid)
    assert name not in netns.run(["ip", "netns", "list"]).stdout
    _assert_no_link(root_if)
    assert not os.path.exists(f"/etc/netns/{name}")
    ns.close()                                   # idempotent


def test_wgpeer_cli_up_detach_and_down(tmp_path):
    require("wireguard-go", "wg")
    state = str(tmp_path / "peer")
    cmd = [sys.executable, "-m", "tsproxy.testing.wgpeer"]
    up = subprocess.run([*cmd, "up", "--detach", "--state", state], capture_output=True, text=True,
                        cwd=REPO, timeout=60)
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    try:
        assert os.path.exists(info["client_conf"]) and info["peer"] == PEER_IP4
        conf = open(info["client_conf"]).read()
        assert "Address = 100.64.0.1/32, fd7a:115c:a1e0::1/128" in conf and f"Endpoint = {info['endpoint']}" in conf
        assert info["namespace"] in netns.run(["ip", "netns", "list"]).stdout
        assert all(netns.alive(pid) for pid in [info["pid"], *info["pids"]])
    finally:
        down = subprocess.run([*cmd, "down", "--state", state], capture_output=True, text=True,
                              cwd=REPO, timeout=60)
    assert down.returncode == 0, down.stderr
    assert info["namespace"] not in netns.run(["ip", "netns", "list"]).stdout
    pids = [info["pid"], *info["pids"]]
    deadline = time.monotonic() + 10             # the holder may still be exiting
    while any(netns.alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if netns.alive(pid)]


def test_wgpeer_cli_down_cleans_up_after_a_killed_holder(tmp_path):
    require("wireguard-go", "wg")
    import signal
    state = str(tmp_path / "peer")
    cmd = [sys.executable, "-m", "tsproxy.testing.wgpeer"]
    up = subprocess.run([*cmd, "up", "--detach", "--state", state], capture_output=True, text=True,
                        cwd=REPO, timeout=60)
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    os.kill(info["pid"], signal.SIGKILL)         # no teardown from the holder itself
    deadline = time.monotonic() + 5
    while netns.alive(info["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    down = subprocess.run([*cmd, "down", "--state", state], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert down.returncode == 0, down.stderr
    assert info["namespace"] not in netns.run(["ip", "netns", "list"]).stdout
    _assert_no_link(info["root_if"])
    assert not os.path.exists(f"/var/run/wireguard/{info['ifname']}.sock")
    assert not any(netns.alive(pid) for pid in info["pids"])
    again = subprocess.run([*cmd, "down", "--state", state], capture_output=True, text=True, cwd=REPO)
    assert (again.returncode, again.stderr + again.stdout) == (1, f"no peer running for {state}\n")


def test_rate_impairment_installs_a_tbf_and_clears(wg_peer):
    """set_rate puts a tbf qdisc of that rate on the interface; clear_rate removes it; a
    transfer over the shaped link still completes. (How much it slows the link is measured by
    bench/bench_impair_rate.py: tests assert no speed.)"""
    n = 300_000

    def qdiscs():
        return wg_peer.exec(["tc", "qdisc", "show", "dev", wg_peer.ns_if]).stdout

    def fetch():
        with socket.create_connection((str(wg_peer.veth_ip), 80), timeout=30) as s:
            s.sendall(b"GET /bytes/%d HTTP/1.1\r\nConnection: close\r\n\r\n" % n)
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        return hashlib.sha256(data.split(b"\r\n\r\n", 1)[1]).hexdigest()

    assert " tbf " not in qdiscs()
    impair.set_rate(wg_peer, wg_peer.ns_if, 20)
    try:
        assert re.search(r"qdisc tbf \S+ root .*rate 20Mbit", qdiscs()), qdiscs()
        assert fetch() == pattern_sha256(n)
    finally:
        impair.clear_rate(wg_peer, wg_peer.ns_if)
    assert " tbf " not in qdiscs()


def _peer_socket_rcvbufs(peer) -> list[int]:
    from tsproxy.testing.wgpeer import WG_PORT
    out = peer.ns.exec(["ss", "-uamnH", "sport", "=", f":{WG_PORT}"]).stdout
    return [int(x) for x in re.findall(r"\brb(\d+)", out)]


def test_the_peer_socket_buffers_can_be_raised_from_outside(wg_peer):
    # bench_load --peer-sockbuf: what current wireguard-go asks for itself, given from outside
    before = _peer_socket_rcvbufs(wg_peer)
    assert before, "wireguard-go has no UDP socket on its port"
    assert wg_peer.set_socket_buffers(4 << 20) == len(before)
    assert _peer_socket_rcvbufs(wg_peer) == [8 << 20] * len(before)      # the kernel doubles it
    wg_peer.set_socket_buffers(before[0] // 2)                           # as it was, for the others
    assert _peer_socket_rcvbufs(wg_peer) == before
