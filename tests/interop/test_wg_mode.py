"""Plain WireGuard mode against a real peer: wireguard-go + the Linux TCP stack in a namespace,
tsproxy in the root namespace, driven through its real CLI and local forwards."""

import asyncio
import hashlib
import os
import random
import re
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port
from tsproxy.testing.servers import pattern_chunks, pattern_sha256
from tsproxy.testing.wgpeer import PEER_IP4, PEER_IP6

pytestmark = pytest.mark.interop

MB = 1_000_000
_extra_ips = iter(range(10, 250))


def own_client_conf(wg_peer, path, extra_peers=""):
    """A config with its own key and tunnel address: two daemons sharing one key would steal
    the peer's session from each other (the peer roams to whoever handshook last)."""
    from tsproxy.keys import NodePrivate
    key, n = NodePrivate.generate(), next(_extra_ips)
    ip4, ip6 = f"100.64.0.{n}", f"fd7a:115c:a1e0::{n:x}"
    wg_peer.add_client(key.public().b64(), ip4, ip6)
    text = wg_peer.client_conf(extra_peers=extra_peers)
    text = text.replace(f"PrivateKey = {wg_peer.client_key.b64()}", f"PrivateKey = {key.b64()}")
    text = re.sub(r"Address = .*", f"Address = {ip4}/32, {ip6}/128", text)
    with open(path, "w") as f:
        f.write(text)
    return str(path), ip4


def fetch_sha256(port: int, path: str, timeout: float = 120) -> tuple[str, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        f = s.makefile("rb")
        status = f.readline()
        assert b" 200 " in status, status
        length = None
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        h = hashlib.sha256()
        n = 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        assert n == length
        return h.hexdigest(), n


@pytest.fixture(scope="module")
def fwd_daemon(wg_peer, tmp_path_factory):
    from tests.conftest import Daemon
    conf = wg_peer.write_client_conf()
    ports = {k: free_port() for k in ("http4", "http6", "echo", "udp")}
    d = Daemon(str(tmp_path_factory.mktemp("daemon")), [
        "--wg-config", conf, "--listen", "off",
        "--forward", f"{ports['http4']}:{PEER_IP4}:80",
        "--forward", f"{ports['http6']}:[{PEER_IP6}]:80",
        "--forward", f"{ports['echo']}:{PEER_IP4}:7",
        "--forward", f"udp:{ports['udp']}:{PEER_IP4}:7",
    ]).start()
    d.ports = ports
    yield d
    assert d.stop() == 0


@pytest.mark.parametrize("family", ["http4", "http6"])
def test_download_100mb_matches_sha256(fwd_daemon, family):
    digest, n = fetch_sha256(fwd_daemon.ports[family], f"/bytes/{100 * MB}")
    assert n == 100 * MB and digest == pattern_sha256(100 * MB)


@pytest.mark.parametrize("family", ["http4", "http6"])
def test_upload_100mb_matches_sha256(fwd_daemon, family):
    size = 100 * MB
    with socket.create_connection(("127.0.0.1", fwd_daemon.ports[family]), timeout=120) as s:
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        for chunk in pattern_chunks(size):
            s.sendall(chunk)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    body = reply.split(b"\r\n\r\n", 1)[1].decode().split()
    assert body == [pattern_sha256(size), str(size)]


def test_200_concurrent_connections_each_1mb_byte_exact(fwd_daemon):
    port = fwd_daemon.ports["echo"]

    async def one(i):
        data = random.Random(i).randbytes(MB)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        async def send():
            for off in range(0, MB, 65536):
                w.write(data[off:off + 65536])
                await w.drain()
            w.write_eof()
        t = asyncio.create_task(send())
        got = await asyncio.wait_for(r.read(-1) if False else _read_all(r), 240)
        await t
        w.close()
        return got == data

    async def _read_all(r):
        buf = bytearray()
        while chunk := await r.read(1 << 20):
            buf += chunk
        return bytes(buf)

    async def main():
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(main())
    assert all(results) and len(results) == 200


def test_udp_forward_echo(fwd_daemon):
    port = fwd_daemon.ports["udp"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for i in range(20):
            msg = b"datagram %d " % i + os.urandom(100)
            s.sendto(msg, ("127.0.0.1", port))
            assert s.recvfrom(2048)[0] == msg


def test_peer_pings_our_tunnel_address(fwd_daemon, wg_peer):
    # the peer learns our endpoint from our first authenticated packet
    fetch_sha256(fwd_daemon.ports["http4"], "/bytes/10")
    r4 = wg_peer.exec(["ping", "-c", "3", "-W", "2", "-i", "0.2", "100.64.0.1"], check=False)
    assert r4.returncode == 0, r4.stdout + r4.stderr
    assert "3 received" in r4.stdout
    r6 = wg_peer.exec(["ping", "-6", "-c", "2", "-W", "2", "-i", "0.2", "fd7a:115c:a1e0::1"], check=False)
    assert r6.returncode == 0, r6.stdout + r6.stderr


def test_peer_sees_our_handshake(fwd_daemon, wg_peer):
    fetch_sha256(fwd_daemon.ports["http4"], "/bytes/1000")
    (peer,) = wg_peer.wg_dump()
    assert peer["latest_handshake"] > time.time() - 200
    assert peer["endpoint"].startswith(str(wg_peer.root_ip))
    st = fwd_daemon.status()
    assert st["peers"][0]["handshake_age"] is not None and st["peers"][0]["rx_bytes"] > 0


def test_garbage_datagrams_are_dropped_and_counted(fwd_daemon):
    before = fwd_daemon.counters()
    port = fwd_daemon.status()["wireguard_port"]
    rnd = random.Random(7)
    garbage = ("wg.rx_short", "wg.rx_bad_type", "wg.rx_unknown_index", "wg.mac1_invalid",
               "wg.response_unexpected")

    def received():
        c = fwd_daemon.counters()
        return c, c["wg.rx_datagrams"] - before["wg.rx_datagrams"]

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for batch in range(20):         # 100 at a time, each batch read before the next is sent,
            for i in range(batch * 100, batch * 100 + 100):    # so the socket buffer never overflows
                kind = i % 4
                if kind == 0:
                    d = rnd.randbytes(rnd.randrange(0, 200))
                elif kind == 1:      # looks like transport data with a bogus index
                    d = b"\x04\0\0\0" + rnd.randbytes(60)
                elif kind == 2:      # initiation-sized garbage
                    d = b"\x01\0\0\0" + rnd.randbytes(144)
                else:
                    d = b"\x02\0\0\0" + rnd.randbytes(88)
                s.sendto(d, ("127.0.0.1", port))
            sent = batch * 100 + 100
            deadline = time.monotonic() + 30
            while (r := received())[1] < sent and time.monotonic() < deadline:
                time.sleep(0.02)
            assert r[1] >= sent, f"only {r[1]} of {sent} datagrams reached the device"
    after = r[0]
    dropped = {k: after.get(k, 0) - before.get(k, 0) for k in garbage}
    assert sum(dropped.values()) == 2000, dropped
    assert dropped["wg.rx_unknown_index"] >= 500 and dropped["wg.mac1_invalid"] >= 500, dropped
    # and the tunnel still works
    assert fetch_sha256(fwd_daemon.ports["http4"], "/bytes/100000")[1] == 100000


def test_unreachable_peer_fails_cleanly_while_others_work(wg_peer, daemon_factory):
    dead = __import__("tsproxy.keys", fromlist=["NodePrivate"]).NodePrivate.generate().public().b64()
    extra = f"\n[Peer]\nPublicKey = {dead}\nEndpoint = {wg_peer.veth_ip}:51999\nAllowedIPs = 10.77.0.0/24\n"
    conf, _ = own_client_conf(wg_peer, os.path.join(wg_peer.workdir, "two-peers.conf"), extra)
    good, bad = free_port(), free_port()
    d = daemon_factory(["--wg-config", conf, "--listen", "off",
                        "--forward", f"{good}:{PEER_IP4}:80", "--forward", f"{bad}:10.77.0.5:80"])

    async def main():
        async def bad_conn():
            r, w = await asyncio.open_connection("127.0.0.1", bad)
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            t0 = time.monotonic()
            try:
                data = await asyncio.wait_for(r.read(), 30)
            except ConnectionResetError:
                data = b""
            return data, time.monotonic() - t0
        bad_task = asyncio.create_task(bad_conn())
        loop = asyncio.get_running_loop()
        good_result = await loop.run_in_executor(None, fetch_sha256, good, f"/bytes/{5 * MB}")
        return await bad_task, good_result

    (data, elapsed), (digest, n) = asyncio.run(main())
    assert data == b"" and elapsed < 20          # closed, not hung
    assert digest == pattern_sha256(5 * MB)
    assert d.status()["forwards"][1]["dial_failures"] >= 1


def test_forward_port_in_use_is_refused_with_a_clear_error(wg_peer, tmp_path):
    conf, _ = own_client_conf(wg_peer, tmp_path / "c.conf")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tsproxy", "up", "--wg-config", conf, "--listen", "off",
                            "--forward", f"{port}:{PEER_IP4}:80", "--state-dir", str(tmp_path / "s")],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], r.stderr


def test_config_error_exits_1_with_one_line(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[Interface]\nPrivateKey = nope\nAddress = 10.0.0.1/32\n[Peer]\nPublicKey = x\n")
    r = subprocess.run([sys.executable, "-m", "tsproxy", "up", "--wg-config", str(conf), "--state-dir",
                        str(tmp_path / "s"), "--foreground"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tsproxy: {conf}:2: PrivateKey: invalid private key")


def test_detached_up_status_and_down(wg_peer, tmp_path):
    conf, my_ip = own_client_conf(wg_peer, tmp_path / "c.conf")
    port = free_port()
    state = str(tmp_path / "state")
    base = [sys.executable, "-m", "tsproxy"]
    r = subprocess.run(base + ["up", "--wg-config", conf, "--listen", "off", "--forward", f"{port}:{PEER_IP4}:80",
                               "--state-dir", state], capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"tsproxy is up: {my_ip}, fd7a:115c:a1e0::")
        assert f"127.0.0.1:{port}->{PEER_IP4}:80" in r.stdout
        assert oct(os.stat(state).st_mode & 0o777) == "0o700"
        again = subprocess.run(base + ["up", "--wg-config", conf, "--listen", "off", "--state-dir", state],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
        st = subprocess.run(base + ["status", "--state-dir", state], capture_output=True, text=True, timeout=10)
        assert "Running" in st.stdout and f"127.0.0.1:{port} -> {PEER_IP4}:80" in st.stdout
        assert fetch_sha256(port, "/bytes/1000")[1] == 1000
    finally:
        down = subprocess.run(base + ["down", "--state-dir", state], capture_output=True, text=True, timeout=30)
    assert down.returncode == 0
    gone = subprocess.run(base + ["status", "--state-dir", state], capture_output=True, text=True, timeout=10)
    assert gone.returncode == 1 and "not running" in gone.stderr


def test_transfer_under_one_percent_loss_is_byte_exact(fwd_daemon, wg_peer):
    from tsproxy.testing.peers import require
    from tsproxy.testing.wgpeer import clear_loss, loss_counters, set_loss
    require("nft")
    set_loss(wg_peer, 10)
    try:
        digest, n = fetch_sha256(fwd_daemon.ports["http4"], f"/bytes/{30 * MB}")
        dropped = loss_counters(wg_peer)
    finally:
        clear_loss(wg_peer)
    assert n == 30 * MB and digest == pattern_sha256(30 * MB)
    assert dropped > 50                                   # the loss really happened


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_transfer_across_two_rekeys_without_a_stall(fwd_daemon):
    """A real peer's timers: our side initiates, so it rekeys every REKEY_AFTER_TIME (120 s)
    while it keeps sending (ACKs).  A drip download over 260 s must see >= 2 new handshakes
    and never go more than a second without data."""
    size, seconds = 26 * MB, 260
    fetch_sha256(fwd_daemon.ports["http4"], "/bytes/10")        # the first handshake is not a rekey
    before = fwd_daemon.status()["peers"][0]["handshakes"]
    assert before >= 1
    with socket.create_connection(("127.0.0.1", fwd_daemon.ports["http4"]), timeout=30) as s:
        s.sendall(f"GET /drip/{size}/{seconds} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        f = s.makefile("rb", buffering=0)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += f.read(1)
        h = hashlib.sha256()
        n, last, max_gap = 0, time.monotonic(), 0.0
        while chunk := f.read(1 << 16):
            now = time.monotonic()
            max_gap = max(max_gap, now - last)
            last = now
            h.update(chunk)
            n += len(chunk)
    after = fwd_daemon.status()["peers"][0]["handshakes"]
    assert n == size and h.hexdigest() == pattern_sha256(size)
    assert after - before >= 2, (before, after)
    assert max_gap < 1.0, max_gap


def test_nc_pipes_stdin_stdout_through_the_daemon(fwd_daemon):
    """`tsproxy nc HOST PORT` (ssh ProxyCommand style) against the peer's TCP echo server."""
    data = os.urandom(3 * MB)
    r = subprocess.run([sys.executable, "-m", "tsproxy", "nc", PEER_IP4, "7", "--state-dir", fwd_daemon.state_dir],
                       input=data, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data
    bad = subprocess.run([sys.executable, "-m", "tsproxy", "nc", PEER_IP4, "1", "--state-dir", fwd_daemon.state_dir],
                         input=b"x", capture_output=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.decode().startswith(f"tsproxy: cannot connect to {PEER_IP4}:1:") and b"refused" in bad.stderr


def test_forward_add_list_remove_on_the_running_daemon(fwd_daemon):
    base = [sys.executable, "-m", "tsproxy", "forward", "--state-dir", fwd_daemon.state_dir]
    port = free_port()
    r = subprocess.run(base + [f"{port}:{PEER_IP4}:80"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == f"127.0.0.1:{port} -> {PEER_IP4}:80", r.stderr
    assert fetch_sha256(port, "/bytes/5000")[1] == 5000
    listed = subprocess.run(base + ["--list"], capture_output=True, text=True, timeout=30).stdout
    assert f"127.0.0.1:{port} -> {PEER_IP4}:80" in listed
    dup = subprocess.run(base + [f"{port}:{PEER_IP4}:80"], capture_output=True, text=True, timeout=30)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad = subprocess.run(base + ["nonsense"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "must look like" in bad.stderr
    rm = subprocess.run(base + ["--remove", str(port)], capture_output=True, text=True, timeout=30)
    assert rm.returncode == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert f"127.0.0.1:{port}" not in subprocess.run(base + ["--list"], capture_output=True, text=True).stdout
