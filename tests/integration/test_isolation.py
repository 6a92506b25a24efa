"""Isolation seen from outside, with real daemons (CLI, sockets) on the loopback test tailnet:

- the netmap's packet filter is enforced on inbound traffic: a deny rule on the test control
  server blocks a reverse forward (TCP from the other node fails) and ping (ICMP echo from an
  in-process node gets no reply), an allow rule opens them again;
- forwards follow the loopback rule at runtime too (IPC `forward` add of 0.0.0.0:P is refused);
- no secret (auth key, private keys, proxy password) in any daemon process's command line, in
  any log line at DEBUG (daemon log files, CLI output) or in `status --json`, in the typical
  scenarios: two tailnet daemons joining with an auth key, one with proxy credentials; a
  WireGuard-mode daemon with a private key in its .conf and a proxy password file.
Every daemon runs with `--non-tailnet refuse`; traffic goes only to loopback."""

import asyncio
import base64
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status
from tests.waiting import until
from tsproxy.daemon import ipc, statedir
from tsproxy.testing.control.mapper import ALLOW_ALL

pytestmark = [pytest.mark.timeout(300)]
PAGE = "hello from tsp-b\n"
USER, PASSWORD = "iso-user", "pw-Zq8vJ3kT0pLm"


def secret_file(path, text):
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text + "\n")
    return str(path)


@pytest.fixture(scope="module")
def pair(tailnet, web, tmp_path_factory):
    """tsp-b publishes the page server with a reverse forward; tsp-a serves a proxy with
    credentials.  Both join with the auth key from a file, at DEBUG."""
    keydir = tmp_path_factory.mktemp("secrets")
    key_arg = "file:" + secret_file(keydir / "authkey", tailnet.auth_key)
    pw_file = secret_file(keydir / "proxy-password", PASSWORD)
    common = ["--login-server", tailnet.control_url, "--auth-key", key_arg,
              "--non-tailnet", "refuse", "--log-level", "debug"]
    b = Daemon(str(tmp_path_factory.mktemp("b") / "st"),
               [*common, "--hostname", "tsp-b", "--listen", "off", "--reverse", f"8080:127.0.0.1:{web}"])
    a_port = free_port()
    a = Daemon(str(tmp_path_factory.mktemp("a") / "st"),
               [*common, "--hostname", "tsp-a", "--listen", f"127.0.0.1:{a_port}",
                "--proxy-user", USER, "--proxy-password-file", pw_file])
    a.proxy_port = a_port
    try:
        b.start(timeout=60)
        a.start(timeout=60)
        eventually(lambda: peer_status(a, "tsp-b"), 30, "tsp-b in tsp-a's netmap")
        yield a, b
    finally:
        a.stop()
        b.stop()


def socks5_get(port, host, dport, user=USER, password=PASSWORD, timeout=10.0):
    """HTTP GET / through the SOCKS5 proxy with RFC 1929 credentials (in-process: a curl
    command line would carry the password).  Returns the body, or 'REPLY <code>' / 'AUTH <st>'."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        u, p = user.encode(), password.encode()
        s.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        st = s.recv(2)
        if st != b"\x01\x00":
            return f"AUTH {st.hex()}"
        h = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(h)]) + h + dport.to_bytes(2, "big"))
        try:
            rep = s.recv(4)
        except TimeoutError:
            return "TIMEOUT connecting"
        if rep[1] != 0:
            return f"REPLY {rep[1]}"
        s.recv(6 if rep[3] == 1 else 18)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            return "TIMEOUT after " + repr(data[:40])
    return data.split(b"\r\n\r\n", 1)[-1].decode()


def http_proxy_get(port, url, user=USER, password=PASSWORD, timeout=10.0):
    cred = base64.b64encode(f"{user}:{password}".encode()).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {cred}\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0].decode()


# -- the packet filter ------------------------------------------------------------------------

def test_packet_filter_deny_blocks_reverse_forward_and_allow_reopens_it(pair, tailnet):
    a, b = pair
    assert socks5_get(a.proxy_port, "tsp-b", 8080) == PAGE
    before = b.counters().get("filter.filter_dropped", 0)
    # only tsp-a's SSH port is open: tsp-b's 8080 is not
    a_ips = a.status()["addresses"]
    tailnet.call(tailnet.control.set_packet_filter, [
        {"SrcIPs": ["*"], "DstPorts": [{"IP": ip, "Ports": {"First": 22, "Last": 22}} for ip in a_ips]}])
    r = eventually(lambda: (lambda r: r if r != PAGE else None)(
        socks5_get(a.proxy_port, "tsp-b", 8080, timeout=4)), 30, "the deny rule blocks tsp-b:8080")
    assert r.startswith(("REPLY", "TIMEOUT")), r
    assert b.counters()["filter.filter_dropped"] > before       # dropped by tsp-b, on the way in
    tailnet.call(tailnet.control.set_packet_filter, ALLOW_ALL)
    eventually(lambda: socks5_get(a.proxy_port, "tsp-b", 8080, timeout=4) == PAGE, 30,
               "the allow rule reopens tsp-b:8080")


# -- forwards and the loopback rule at runtime --------------------------------------------------

def test_ipc_forward_add_on_a_public_address_is_refused(pair):
    a, _ = pair
    port = free_port()
    r = ipc.call(statedir.socket_path(a.state_dir), {"op": "forward.add",
                                                      "spec": f"0.0.0.0:{port}:tsp-b:8080"})
    assert r["ok"] is False and "--allow-public-without-auth" in r["error"], r
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    ok = ipc.call(statedir.socket_path(a.state_dir), {"op": "forward.add",
                                                       "spec": f"127.0.0.1:{port}:tsp-b:8080"})
    assert ok["ok"] is True, ok
    ipc.call(statedir.socket_path(a.state_dir), {"op": "forward.remove", "key": f"tcp:{port}"})


def test_startup_forward_on_a_public_address_is_refused(tailnet, tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "tsproxy", "up", "--foreground", "--state-dir",
                        str(tmp_path / "st"), "--login-server", tailnet.control_url,
                        "--non-tailnet", "refuse", "--listen", "off",
                        "--forward", f"0.0.0.0:{port}:tsp-b:8080"],
                       capture_output=True, text=True, cwd=REPO, timeout=60,
                       env={**os.environ, "TS_AUTHKEY": ""})
    assert r.returncode != 0
    assert "refusing to open forward" in r.stderr and "--allow-public-without-auth" in r.stderr, r.stderr


# -- no secret in command lines, logs or status -------------------------------------------------

def key_forms(raw: bytes) -> list[str]:
    return [raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
            base64.b64encode(raw).decode().rstrip("=")]


def state_file_secrets(state_dir) -> list[str]:
    with open(os.path.join(state_dir, "control-state.json")) as f:
        st = json.load(f)
    out = []
    for k in ("machine_key", "node_key", "old_node_key"):
        if st.get(k):
            assert st[k].startswith("privkey:")
            out += [st[k], *key_forms(bytes.fromhex(st[k][len("privkey:"):]))]
    return out


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat's ppid)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def assert_no_secret_in_cmdlines(daemons, secrets):
    seen = 0
    for d in daemons:
        for pid in process_tree(d.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            seen += 1
            for s in secrets:
                assert s not in cmd, f"a secret in the command line of pid {pid}"
    assert seen >= len(daemons)


def assert_no_secret_in_texts(texts: dict, secrets):
    assert sum(len(t) for t in texts.values()) > 0
    for where, text in texts.items():
        for s in secrets:
            assert s not in text, f"a secret ({len(s)} chars) in {where}"


def state_dir_logs(d) -> dict:
    out = {}
    for name in os.listdir(d.state_dir):
        if name in ("control-state.json", statedir.SOCKET_NAME, statedir.LOCK_NAME):
            continue
        path = os.path.join(d.state_dir, name)
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                out[path] = f.read()
    return out


def cli_out(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "tsproxy", *args], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    return r.stdout + r.stderr


def test_tailnet_scenario_leaks_no_secret(pair, tailnet):
    a, b = pair
    # exercise the credential paths: right and wrong, SOCKS5 and HTTP
    assert socks5_get(a.proxy_port, "tsp-b", 8080) == PAGE
    assert socks5_get(a.proxy_port, "tsp-b", 8080, password=PASSWORD + "x") == "AUTH 0101"
    assert socks5_get(a.proxy_port, "tsp-b", 8080, user="mallory") == "AUTH 0101"
    assert http_proxy_get(a.proxy_port, "http://tsp-b:8080/") == "HTTP/1.1 200 OK"
    assert http_proxy_get(a.proxy_port, "http://tsp-b:8080/", password="nope").startswith("HTTP/1.1 407")
    secrets = [tailnet.auth_key, PASSWORD, *state_file_secrets(a.state_dir),
               *state_file_secrets(b.state_dir)]
    assert len(secrets) >= 2 + 2 * 5
    assert_no_secret_in_cmdlines([a, b], secrets)
    texts = {}
    for d in (a, b):
        texts.update(state_dir_logs(d))
        texts[f"status --json of {d.state_dir}"] = cli_out("status", "--json", "--state-dir", d.state_dir)
        texts[f"status of {d.state_dir}"] = cli_out("status", "--state-dir", d.state_dir)
    assert any("DEBUG" in t or "debug" in t for t in texts.values()), "no DEBUG line was logged"
    assert_no_secret_in_texts(texts, secrets)


def test_wireguard_scenario_leaks_no_secret(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption
    priv = X25519PrivateKey.generate()
    raw = priv.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    peer_pub = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    psk = os.urandom(32)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # a peer endpoint that never answers
    silent.bind(("127.0.0.1", 0))
    conf = tmp_path / "wg0.conf"
    secret_file(conf, f"[Interface]\nPrivateKey = {base64.b64encode(raw).decode()}\n"
                      "Address = 10.77.0.2/32\n\n[Peer]\n"
                      f"PublicKey = {base64.b64encode(peer_pub).decode()}\n"
                      f"PresharedKey = {base64.b64encode(psk).decode()}\n"
                      f"AllowedIPs = 10.77.0.0/24\nEndpoint = 127.0.0.1:{silent.getsockname()[1]}\n")
    pw_file = secret_file(tmp_path / "pw", PASSWORD)
    port = free_port()
    d = Daemon(str(tmp_path / "st"), ["--wg-config", str(conf), "--listen", f"127.0.0.1:{port}",
                                      "--proxy-user", USER, "--proxy-password-file", pw_file,
                                      "--non-tailnet", "refuse", "--log-level", "debug"])
    try:
        d.start(timeout=30)
        # a tunnel dial (handshake attempts go to the silent loopback socket), bad credentials
        assert socks5_get(port, "10.77.0.1", 80, password="bad") == "AUTH 0101"
        try:
            socks5_get(port, "10.77.0.1", 80, timeout=3)
        except OSError:
            pass
        eventually(lambda: silent.recvfrom(4096)[0][:1] == b"\x01", 10, "a handshake initiation sent")
        secrets = [PASSWORD, *key_forms(raw), *key_forms(psk)]
        assert_no_secret_in_cmdlines([d], secrets)
        texts = state_dir_logs(d)
        texts["status --json"] = cli_out("status", "--json", "--state-dir", d.state_dir)
        texts["status"] = cli_out("status", "--state-dir", d.state_dir)
        assert_no_secret_in_texts(texts, secrets)
    finally:
        d.stop()
        silent.close()


# -- the packet filter on ICMP echo (ping) ------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmp4_echo(src: str, dst: str, ident: int, seq: int) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"iso-ping"
    body = body[:2] + struct.pack("!H", _csum(body)) + body[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), seq, 0, 64, 1, 0,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + body


async def test_packet_filter_deny_blocks_ping_and_allow_permits_it(pair, tailnet, tmp_path):
    """An in-process tailnet node (the daemon's own TailnetPlane) sends raw ICMP echo requests
    to tsp-b's address through the tunnel and watches what comes back."""
    from tsproxy.daemon.tailnet import TailnetPlane
    _, b = pair
    b_ip = next(ip for ip in b.status()["addresses"] if ":" not in ip)
    plane = TailnetPlane(control_url=tailnet.control_url, state_dir=str(tmp_path / "pinger"),
                         hostname="tsp-pinger", auth_key=tailnet.auth_key, ephemeral=True,
                         non_tailnet="refuse")
    stopping = asyncio.Event()
    replies = []
    try:
        assert await asyncio.wait_for(plane.start(stopping), 60)
        me = next(ip for ip in plane.addresses() if ":" not in ip)
        to_stack = plane.netstack.deliver

        def from_tunnel(packets):          # what reaches our stack after our own inbound filter
            for p in packets:
                if p[9] == 1 and p[20] == 0 and p[12:16] == ipaddress.ip_address(b_ip).packed:
                    replies.append(struct.unpack("!H", p[26:28])[0])
            to_stack(packets)
        plane.netstack.deliver = from_tunnel
        seq = 0

        async def ping(wait: float) -> bool:
            nonlocal seq
            seq += 1
            plane.pipeline.down([icmp4_echo(me, b_ip, 0x150, seq)])
            deadline = asyncio.get_running_loop().time() + wait
            while asyncio.get_running_loop().time() < deadline:
                if seq in replies:
                    return True
                await asyncio.sleep(0.05)
            return False

        await until(lambda: ping(1.0), "an echo reply from tsp-b under the allow-all filter", 40)
        replied_before = b.counters()["netstack.icmp_echo_replied"]
        dropped_before = b.counters()["filter.filter_dropped"]
        tailnet.call(tailnet.control.set_packet_filter, [
            {"SrcIPs": ["*"], "DstPorts": [{"IP": me, "Ports": {"First": 22, "Last": 22}}]}])

        async def denied():
            return not await ping(1.0) and b.counters()["filter.filter_dropped"] > dropped_before
        await until(denied, "tsp-b dropping our echo requests under the deny rule", 40)
        replied_at_deny = b.counters()["netstack.icmp_echo_replied"]
        for _ in range(3):
            assert not await ping(2.0), "an echo reply under the deny rule"
        assert b.counters()["netstack.icmp_echo_replied"] == replied_at_deny >= replied_before
        tailnet.call(tailnet.control.set_packet_filter, [
            {"SrcIPs": [me], "DstPorts": [{"IP": b_ip, "Ports": {"First": 0, "Last": 65535}}]}])
        await until(lambda: ping(1.0), "an echo reply again under the allow rule", 40)
    finally:
        tailnet.call(tailnet.control.set_packet_filter, ALLOW_ALL)
        stopping.set()
        await plane.aclose()
