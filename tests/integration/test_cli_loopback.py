"""The CLI commands a developer uses most, against a loopback peer, without root: two tsproxy
nodes join the loopback test tailnet (our control server + DERP relay on 127.0.0.1); the peer
`tsp-peer` publishes a page server and a TCP echo server from this host with `--reverse`. The
same commands are tested against a real WireGuard peer in tests/interop/test_wg_mode.py (root).

Covered: `nc`, `forward` add/list/remove, detached `up` / `status` / `down`, and the
port-in-use error. Every daemon runs with `--non-tailnet refuse`."""

import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status

pytestmark = [pytest.mark.timeout(300)]
PAGE = "hello from tsp-b\n"
CLI = [sys.executable, "-m", "tsproxy"]


def cli(*args, **kw):
    kw.setdefault("timeout", 60)
    return subprocess.run([*CLI, *args], capture_output=True, cwd=REPO, **kw)


def cli_text(*args, **kw):
    return cli(*args, text=True, **kw)


@pytest.fixture(scope="module")
def echo():
    """TCP echo server on loopback (one thread per connection)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)

    def one(c):
        with c:
            while data := c.recv(1 << 16):
                c.sendall(data)

    def serve():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(c,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    yield ls.getsockname()[1]
    ls.close()


def join_args(tailnet, hostname):
    return ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
            "--hostname", hostname, "--non-tailnet", "refuse"]


@pytest.fixture(scope="module")
def peer(tailnet, web, echo, tmp_path_factory):
    d = Daemon(str(tmp_path_factory.mktemp("peer")),
               [*join_args(tailnet, "tsp-peer"), "--listen", "off",
                "--reverse", f"8080:127.0.0.1:{web}", "--reverse", f"7:127.0.0.1:{echo}"])
    try:
        d.start(timeout=60)
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def client(tailnet, peer, tmp_path_factory):
    d = Daemon(str(tmp_path_factory.mktemp("client")),
               [*join_args(tailnet, "tsp-cli"), "--listen", "off"])
    try:
        d.start(timeout=60)
        eventually(lambda: peer_status(d, "tsp-peer"), 30, "tsp-peer in tsp-cli's netmap")
        yield d
    finally:
        d.stop()


def http_get(port, path="/", timeout=30):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body.decode()


def test_nc_pipes_stdin_stdout_to_a_tailnet_peer(client):
    data = os.urandom(1_000_000)
    r = cli("nc", "tsp-peer", "7", "--state-dir", client.state_dir, input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data
    # nothing listens on tsp-peer:1: its netstack answers RST
    bad = cli_text("nc", "tsp-peer", "1", "--state-dir", client.state_dir, input="x")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("tsproxy: cannot connect to tsp-peer:1:") and "refused" in bad.stderr, \
        bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_nc_to_a_name_outside_the_tailnet_is_refused(client):
    before = client.counters()
    r = cli_text("nc", "nothing.example", "80", "--state-dir", client.state_dir, input="x")
    assert (r.returncode, r.stdout, r.stderr) == (1, "", (
        "tsproxy: cannot connect to nothing.example:80: nothing.example:80 is not on the tunnel "
        "and --non-tailnet is refuse\n"))
    after = client.counters()
    assert after["dialer.dial_refused_policy"] - before["dialer.dial_refused_policy"] == 1
    assert after["dialer.dial_direct"] == before["dialer.dial_direct"] == 0


def test_forward_add_list_remove_on_the_running_daemon(client):
    base = ["forward", "--state-dir", client.state_dir]
    port = free_port()
    r = cli_text(*base, f"{port}:tsp-peer:8080")
    assert r.returncode == 0 and r.stdout.strip() == f"127.0.0.1:{port} -> tsp-peer:8080", r.stderr
    assert http_get(port) == (b"HTTP/1.1 200 OK", PAGE)
    listed = cli_text(*base, "--list")
    assert listed.returncode == 0 and f"127.0.0.1:{port} -> tsp-peer:8080" in listed.stdout
    dup = cli_text(*base, f"{port}:tsp-peer:8080")
    assert dup.returncode == 1 and "already exists" in dup.stderr, dup.stderr
    bad = cli_text(*base, "nonsense")
    assert bad.returncode == 1 and "must look like" in bad.stderr, bad.stderr
    rm = cli_text(*base, "--remove", str(port))
    assert rm.returncode == 0, rm.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert f"127.0.0.1:{port}" not in cli_text(*base, "--list").stdout


def test_detached_up_status_and_down(tailnet, peer, tmp_path):
    port = free_port()
    state = str(tmp_path / "state")
    up = [*join_args(tailnet, "tsp-detached"), "--listen", "off",
          "--forward", f"{port}:tsp-peer:8080", "--state-dir", state]
    r = cli_text("up", *up)
    try:
        assert r.returncode == 0, r.stderr
        assert re.fullmatch(r"tsproxy is up as tsp-detached\.tailnet\.test: 100\.64\.\d+\.\d+, "
                            r"fd7a:115c:a1e0::[0-9a-f:]+; forwards 127\.0\.0\.1:%d->tsp-peer:8080; "
                            r"\d+ peers? online\n" % port, r.stdout), r.stdout
        assert oct(os.stat(state).st_mode & 0o777) == "0o700"
        again = cli_text("up", *up)
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        st = cli_text("status", "--state-dir", state)
        assert st.returncode == 0 and "Running" in st.stdout, st.stdout
        assert f"127.0.0.1:{port} -> tsp-peer:8080" in st.stdout, st.stdout
        assert eventually(lambda: "tsp-peer" in cli_text("status", "--state-dir", state).stdout,
                          30, "tsp-peer in the status")
        assert http_get(port) == (b"HTTP/1.1 200 OK", PAGE)
    finally:
        down = cli_text("down", "--state-dir", state)
    assert down.returncode == 0, down.stderr
    gone = cli_text("status", "--state-dir", state, timeout=10)
    assert gone.returncode == 1 and "not running" in gone.stderr, gone.stderr
    again = cli_text("down", "--state-dir", state)
    assert again.returncode == 1 and "not running" in again.stderr, again.stderr


def test_forward_port_in_use_is_refused_with_a_clear_error(tailnet, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli_text("up", *join_args(tailnet, "tsp-busy"), "--listen", "off",
                     "--forward", f"{port}:tsp-peer:8080", "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "s" / "tsproxy.sock") or \
        cli_text("status", "--state-dir", str(tmp_path / "s")).returncode == 1
