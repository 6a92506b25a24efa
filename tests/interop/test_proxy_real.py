"""The proxy listener against a real WireGuard peer (wireguard-go + Linux TCP in a namespace),
with tsproxy started through its real CLI: curl in every proxy mode, python-socks, httpx, a DNS
query over SOCKS5 UDP ASSOCIATE to the peer's resolver, and headless Chromium through SOCKS5 and
through the PAC file (screenshots kept in tests/artifacts/)."""

import os
import shutil
import signal
import socket
import struct
import subprocess

import pytest

from tests.conftest import Daemon, free_port, stub_resolver
from tsproxy.testing.wgpeer import DNS_NAME, PEER_IP4, PEER_IP6

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

HELLO = b"hello from tsp-peer\n"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")


@pytest.fixture(scope="module")
def proxy_daemon(wg_peer, tmp_path_factory):
    conf = wg_peer.write_client_conf(dns=True)
    port = free_port()
    d = Daemon(str(tmp_path_factory.mktemp("proxyd")), [
        "--wg-config", conf, "--listen", f"127.0.0.1:{port}", "--non-tailnet", "refuse"]).start()
    d.port = port
    yield d
    assert d.stop() == 0


def curl(*args):
    if not shutil.which("curl"):
        if os.environ.get("CI") == "true":
            pytest.fail("curl is missing")
        pytest.skip("curl is not installed")
    p = subprocess.run(["curl", "-sS", "--max-time", "30", *args], capture_output=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("args,url", [
    (["--socks5"], f"http://{PEER_IP4}/"),
    (["--socks5"], f"http://[{PEER_IP6}]/"),
    (["--socks5-hostname"], f"http://{DNS_NAME}/"),
    (["--socks4a"], f"http://{DNS_NAME}/"),
    (["--socks4"], f"http://{PEER_IP4}/"),
    (["-x"], f"http://{DNS_NAME}/"),
    (["--proxytunnel", "-x"], f"http://{DNS_NAME}/"),
])
def test_curl_modes_real_peer(proxy_daemon, args, url):
    proxy = f"http://127.0.0.1:{proxy_daemon.port}" if "-x" in args else f"127.0.0.1:{proxy_daemon.port}"
    rc, out, err = curl(*args, proxy, url)
    assert rc == 0, err
    assert out == HELLO


def test_curl_big_download_through_socks_and_http(proxy_daemon):
    from tsproxy.testing.servers import pattern_sha256
    import hashlib
    n = 20_000_000
    for args in (["--socks5-hostname", f"127.0.0.1:{proxy_daemon.port}"],
                 ["-x", f"http://127.0.0.1:{proxy_daemon.port}"],
                 ["-p", "-x", f"http://127.0.0.1:{proxy_daemon.port}"]):
        rc, out, err = curl(*args, f"http://{PEER_IP4}/bytes/{n}")
        assert rc == 0, err
        assert hashlib.sha256(out).hexdigest() == pattern_sha256(n)


def test_python_socks_echo_and_httpx(proxy_daemon):
    from python_socks.sync import Proxy
    s = Proxy.from_url(f"socks5://127.0.0.1:{proxy_daemon.port}", rdns=True).connect(
        dest_host=DNS_NAME, dest_port=7, timeout=20)
    payload = os.urandom(200_000)
    s.sendall(payload)
    got = b""
    s.settimeout(20)
    while len(got) < len(payload):
        chunk = s.recv(65536)
        assert chunk
        got += chunk
    s.close()
    assert got == payload
    import httpx
    with httpx.Client(proxy=f"socks5://127.0.0.1:{proxy_daemon.port}", timeout=20) as c:
        assert c.get(f"http://{PEER_IP4}/").content == HELLO
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy_daemon.port}", timeout=20) as c:
        for _ in range(3):       # keep-alive to the proxy and a pooled upstream
            assert c.get(f"http://{DNS_NAME}/").content == HELLO


def _dns_query(name: str, qid: int = 0x4242) -> bytes:
    q = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def test_dns_over_socks5_udp_associate(proxy_daemon):
    c = socket.create_connection(("127.0.0.1", proxy_daemon.port), timeout=20)
    c.sendall(b"\x05\x01\x00" + b"\x05\x03\x00\x01\0\0\0\0\0\0")
    rep = b""
    while len(rep) < 12:
        rep += c.recv(12 - len(rep))
    assert rep[:2] == b"\x05\x00" and rep[2:6] == b"\x05\x00\x00\x01"
    relay = (socket.inet_ntoa(rep[6:10]), struct.unpack("!H", rep[10:12])[0])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    hdr = b"\0\0\0\x01" + socket.inet_aton(PEER_IP4) + struct.pack("!H", 53)
    answer = None
    for _ in range(4):                  # UDP: retry like a resolver would
        u.sendto(hdr + _dns_query(DNS_NAME), relay)
        try:
            answer, _ = u.recvfrom(4096)
            break
        except socket.timeout:
            continue
    u.close()
    c.close()
    assert answer is not None, "no DNS answer through UDP ASSOCIATE"
    assert answer.startswith(hdr)
    dns = answer[len(hdr):]
    assert dns[:2] == b"\x42\x42" and dns[3] & 0x0F == 0          # our id, NOERROR
    assert struct.unpack("!H", dns[6:8])[0] >= 1 and socket.inet_aton(PEER_IP4) in dns


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe


# Chromium never resolves or connects by itself: every name maps to NOTFOUND (the proxy
# resolves), loopback is not bypassed, and as root its resolv.conf names only the stub resolver
# (whose queries the conftest guard fails the test on).  Whatever PAC or proxy we give it, a
# request that is not sent to the test proxy fails instead of leaving the machine.
NO_EGRESS = ["--proxy-bypass-list=<-loopback>",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"]


def _chromium_run(cmd: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    """cmd in its own process group, the whole group killed however this ends."""
    stub = stub_resolver()
    proc = subprocess.Popen(stub.wrap(cmd) if stub else cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)      # renderers, zygotes, crashpad
        except ProcessLookupError:
            pass
        proc.wait()


def _run_chromium(tmp_path, proxy_args, url, shot):
    exe = _chromium()
    # after a failed page load Chromium probes DNS itself (google.com through the system
    # resolver, and 8.8.8.8 directly; seen with scripts/watch-egress.sh): that is the
    # "alternate error pages" preference, off in the profile we give it
    os.makedirs(tmp_path / "profile" / "Default", exist_ok=True)
    with open(tmp_path / "profile" / "Default" / "Preferences", "w") as f:
        f.write('{"alternate_error_pages": {"enabled": false}}')
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", *NO_EGRESS, *proxy_args]
    dom = _chromium_run(base + ["--dump-dom", url])
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, shot)
    if os.path.exists(path):
        os.unlink(path)
    _chromium_run(base + [f"--screenshot={path}", "--window-size=800,300", url])
    return dom.stdout, path, dom.stderr


def test_chromium_through_socks5(proxy_daemon, tmp_path):
    dom, shot, err = _run_chromium(tmp_path, [f"--proxy-server=socks5://127.0.0.1:{proxy_daemon.port}"],
                              f"http://{DNS_NAME}/", "chromium-socks5.png")
    assert b"hello from tsp-peer" in dom, err[-1500:]
    assert os.path.getsize(shot) > 1000


@pytest.mark.parametrize("host,shot", [(DNS_NAME, "chromium-pac-name.png"), (PEER_IP4, "chromium-pac-ip.png")])
def test_chromium_with_pac(proxy_daemon, tmp_path, host, shot):
    # neither the name (only the tunnel's DNS knows it) nor the peer's page at 100.64.0.2 (it
    # lives in a namespace the host does not route to) is reachable DIRECT: the page only
    # loads if the PAC sent the request through the proxy
    dom, shot, err = _run_chromium(tmp_path, [f"--proxy-pac-url=http://127.0.0.1:{proxy_daemon.port}/proxy.pac"],
                                   f"http://{host}/", shot)
    assert b"hello from tsp-peer" in dom, err[-1500:]
    assert os.path.getsize(shot) > 1000


def test_chromium_does_not_go_direct(proxy_daemon, tmp_path):
    """A host the PAC sends DIRECT fails inside Chromium (no resolution, no connect); the
    egress guard checks that the stub resolver saw no query for it."""
    dom, _, _ = _run_chromium(tmp_path, [f"--proxy-pac-url=http://127.0.0.1:{proxy_daemon.port}/proxy.pac"],
                              "http://outside-host.example/", "chromium-direct-refused.png")
    assert b"hello" not in dom
    stub = stub_resolver()
    if stub is not None:
        assert not [n for n in stub.names() if "outside-host" in n]


@pytest.fixture
def auth_daemon(wg_peer, tmp_path_factory):
    """Last in this module: it shares the client key with proxy_daemon, so once it has
    handshaken the peer talks to it and proxy_daemon would have to re-handshake."""
    conf = wg_peer.write_client_conf(dns=True)
    port = free_port()
    tmp = tmp_path_factory.mktemp("authd")
    pw = tmp / "pw"
    pw.write_text("s3cret\n")
    d = Daemon(str(tmp / "state"), ["--wg-config", conf, "--listen", f"127.0.0.1:{port}",
                                    "--proxy-user", "alice", "--proxy-password-file", str(pw)]).start()
    d.port = port
    yield d
    assert d.stop() == 0


def test_curl_with_auth_real_peer(auth_daemon):
    p = auth_daemon.port
    url = f"http://{DNS_NAME}/"
    assert curl("-x", f"socks5h://alice:s3cret@127.0.0.1:{p}", url)[1] == HELLO
    assert curl("-x", f"http://127.0.0.1:{p}", "-U", "alice:s3cret", url)[1] == HELLO
    assert curl("-x", f"http://127.0.0.1:{p}", "-U", "alice:s3cret", "-p", url)[1] == HELLO
    rc, _, err = curl("-x", f"socks5h://alice:nope@127.0.0.1:{p}", url)
    assert (rc, err) == (97, b"curl: (97) User was rejected by the SOCKS5 server (1 1).\n")
    rc, out, _ = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{p}", url)
    assert out == b"407"


def test_reverse_forward_from_the_peer_to_a_local_service(wg_peer, tmp_path):
    """`--reverse TPORT:127.0.0.1:LPORT`: curl inside the peer's namespace fetches a page from a
    web server on our loopback through 100.64.0.1:TPORT.  Runs after every proxy_daemon test
    (same client key)."""
    import http.server
    import threading
    from tsproxy.testing.wgpeer import CLIENT_IP4
    body = os.urandom(16).hex().encode()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    tport = 18000 + os.getpid() % 1000
    # PersistentKeepalive makes us handshake first: until then the peer has no endpoint for us
    conf = wg_peer.write_client_conf(keepalive=1)
    d = Daemon(str(tmp_path / "rev"), ["--wg-config", conf, "--listen", "off",
                                       "--reverse", f"{tport}:127.0.0.1:{srv.server_address[1]}"]).start()
    try:
        r = wg_peer.exec(["curl", "-sS", "--max-time", "20", f"http://{CLIENT_IP4}:{tport}/"],
                         check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout == body.decode()
    finally:
        assert d.stop() == 0
        srv.shutdown()
        srv.server_close()
