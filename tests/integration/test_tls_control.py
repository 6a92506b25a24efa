"""TLS as in production, over loopback (no root): `python -m tsproxy.testing serve --tls`
serves HTTPS control with a throwaway CA (curl --cacert gets /key; plain HTTP on the TLS port
is refused cleanly), and tsproxy registers over https:// when it trusts that CA
(--control-ca-file, config file, SSL_CERT_FILE) and fails with one clear line when it does not."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def served():
    """`serve --tls` as a user runs it: a child process and its JSON line."""
    proc = subprocess.Popen([sys.executable, "-m", "tsproxy.testing", "serve", "--tls",
                             "--listen", "127.0.0.1:0"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        yield proc, json.loads(line)
    finally:
        proc.terminate()
        proc.wait(15)


def _curl(*args):
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          text=True, timeout=20)


def test_serve_tls_prints_ca_file_and_curl_verifies(served):
    require("curl")
    _, info = served
    assert info["control_url"].startswith("https://127.0.0.1:")
    assert info["http_control_url"].startswith("http://127.0.0.1:")
    ca = info["ca_file"]
    with open(ca) as f:
        assert f.read().startswith("-----BEGIN CERTIFICATE-----")
    r = _curl("--cacert", ca, info["control_url"] + "/key?v=100")
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)["publicKey"]
    assert key.startswith("mkey:") and len(key) == 5 + 64
    # the plain listener serves the same server (same key)
    r = _curl(info["http_control_url"] + "/key?v=100")
    assert json.loads(r.stdout)["publicKey"] == key
    # without the CA, curl refuses the certificate (60: peer certificate cannot be verified)
    r = _curl(info["control_url"] + "/key")
    assert r.returncode == 60, (r.returncode, r.stderr)
    # the DERP relay's certificate is signed by the same CA, for its IP
    r = _curl("--cacert", ca, info["derp_url"].replace("/derp", "/derp/probe"))
    assert r.returncode == 0, r.stderr


def test_plain_http_on_the_tls_port_is_refused_cleanly(served):
    require("curl")
    proc, info = served
    plain = info["control_url"].replace("https://", "http://")
    r = _curl("-i", plain + "/key")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.startswith("HTTP/1.0 400 Bad Request\n"), r.stdout   # (CRLF read as LF)
    assert r.stdout.endswith("\n\nClient sent an HTTP request to an HTTPS server.\n")
    # not HTTP at all, and a client that goes away before saying anything
    import socket
    host, port = info["control_url"].split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x00\x05hello")           # a broken TLS record
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(4096):              # a TLS alert at most, then the server closes
            got += chunk
        assert not got.startswith(b"HTTP/") and len(got) < 100, got
    socket.create_connection((host, int(port)), timeout=10).close()
    # the server is still fine afterwards, and said nothing about it
    r = _curl("--cacert", info["ca_file"], info["control_url"] + "/key")
    assert r.returncode == 0, r.stderr
    proc.terminate()
    _, err = proc.communicate(timeout=15)
    assert "Traceback" not in err and "Error" not in err, err


@pytest.fixture(scope="module")
def tls_tailnet():
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host="127.0.0.1", tls=True) as net:
        yield net


def _args(net, name, *extra):
    return ["--login-server", net.control_url, "--auth-key", net.auth_key, "--hostname", name,
            "--listen", f"127.0.0.1:{free_port()}", "--non-tailnet", "refuse", *extra]


def test_registers_over_https_with_the_ca_file(tls_tailnet, tmp_path):
    net = tls_tailnet
    assert net.control_url.startswith("https://") and os.path.exists(net.ca_file)
    d = Daemon(str(tmp_path / "a"), _args(net, "tls-a", "--control-ca-file", net.ca_file))
    try:
        d.start(timeout=60)
        st = d.status()
        assert st["control"]["last_error"] == ""
        node = net.node("tls-a")
        assert node is not None and node.online
        # DERP was verified against the same CA (no InsecureForTests in the map)
        region = net.control.derp_map["Regions"]["900"]["Nodes"][0]
        assert "InsecureForTests" not in region
        eventually(lambda: net.call(lambda: len(net.derps[0].clients) == 1), 30,
                   "tsproxy connected to the verified DERP relay")
    finally:
        d.stop()


def test_config_file_key_and_ssl_cert_file(tls_tailnet, tmp_path, monkeypatch):
    net = tls_tailnet
    conf = tmp_path / "config.toml"
    conf.write_text(f'control-ca-file = "{net.ca_file}"\n')
    d = Daemon(str(tmp_path / "b"), _args(net, "tls-b", "--config", str(conf)))
    try:
        d.start(timeout=60)
    finally:
        d.stop()
    monkeypatch.setenv("SSL_CERT_FILE", net.ca_file)      # what the user trusts, OpenSSL-wide
    d = Daemon(str(tmp_path / "c"), _args(net, "tls-c"))
    try:
        d.start(timeout=60)
    finally:
        d.stop()


def _up(state, args, env=None):
    return subprocess.run([sys.executable, "-m", "tsproxy", "up", "--state-dir", state, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


def test_wrong_ca_fails_at_up_with_one_line(tls_tailnet, tmp_path):
    from tsproxy.testing.tlsca import TestCA
    net = tls_tailnet
    other = TestCA("some other CA").write(str(tmp_path))
    host_port = net.control_url.split("//", 1)[1]
    before = net.control.counters["http_requests"]
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    for i, extra in enumerate((["--control-ca-file", other], [])):   # a wrong CA; system roots
        r = _up(str(tmp_path / f"w{i}"), _args(net, f"tls-w{i}", *extra), env)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stderr.splitlines() == [
            f"tsproxy: control server {host_port}: certificate verify failed: "
            "unable to get local issuer certificate"], r.stderr
        assert r.stdout == ""
    assert net.control.counters["http_requests"] == before      # no request ever got through
    assert net.node("tls-w0") is None and net.node("tls-w1") is None


def test_bad_ca_file_is_a_config_error(tls_tailnet, tmp_path):
    net = tls_tailnet
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for path, why in ((str(tmp_path / "missing.pem"), "no such file"),
                      (str(junk), "not a PEM certificate file")):
        r = _up(str(tmp_path / "s"), _args(net, "tls-x", "--control-ca-file", path))
        assert r.returncode == 1
        assert r.stderr.splitlines() == [f"tsproxy: {path}: --control-ca-file: {why}"], r.stderr


def test_derp_uses_the_same_trust(tls_tailnet, tmp_path):
    """Control over the plain port, no CA given: the node comes up, but the CA-signed DERP relay
    (no InsecureForTests) is refused, with one line in the log; with the CA it connects."""
    net = tls_tailnet
    args = ["--login-server", net.http_control_url, "--auth-key", net.auth_key,
            "--listen", f"127.0.0.1:{free_port()}", "--non-tailnet", "refuse"]
    d = Daemon(str(tmp_path / "p"), [*args, "--hostname", "tls-plain"])
    try:
        d.start(timeout=60)
        derp = net.derps[0]
        line = (f"DERP server 127.0.0.1:{derp.port}: certificate verify failed: "
                "unable to get local issuer certificate")
        eventually(lambda: line in d.log(), 30, "the DERP verification failure logged")
        assert d.log().count(line) == 1
        assert d.status()["magicsock"]["derp_errors"] == {"900": line}
        assert net.call(lambda: len(derp.clients)) == 0
    finally:
        d.stop()
    d = Daemon(str(tmp_path / "q"), [*args, "--hostname", "tls-plain-ca",
                                     "--control-ca-file", net.ca_file])
    try:
        d.start(timeout=60)
        eventually(lambda: net.call(lambda: len(net.derps[0].clients)) == 1, 30,
                   "DERP verified with --control-ca-file")
        assert "certificate verify failed" not in d.log()
    finally:
        d.stop()
