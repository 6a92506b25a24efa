"""`tsproxy ping`, `whois` and `netcheck` through the real CLI against two daemons on the loopback
test tailnet (two DERP regions), no root."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, Daemon
from tests.tailnet_helpers import eventually, peer_status

pytestmark = [pytest.mark.timeout(300)]
BASE = ["--non-tailnet", "refuse", "--listen", "off"]


def tsp(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tsproxy", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tailnet():
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host="127.0.0.1", derp_regions=2) as net:
        yield net


@pytest.fixture(scope="module")
def pair(tailnet, tmp_path_factory):
    ds = [Daemon(str(tmp_path_factory.mktemp(n)), ["--login-server", tailnet.control_url,
                                                   "--auth-key", tailnet.auth_key,
                                                   "--hostname", n, *BASE]) for n in ("pa", "pb")]
    try:
        for d in ds:
            d.start(timeout=60)
        eventually(lambda: peer_status(ds[0], "pb"), 30, "pb in pa's netmap")
        yield ds
    finally:
        for d in ds:
            d.stop()


# direct paths are this machine's own addresses (loopback or an interface address)
PONG = re.compile(r"pong from pb \((100\.64\.0\.\d+)\) via (DERP\((90[01])\)|[0-9.]+:\d+|\[[0-9a-f:]+\]:\d+) "
                  r"in \d+ms")


def test_ping_derp_then_direct(pair):
    a, b = pair
    r = tsp("ping", "--state-dir", a.state_dir, "-c", "10", "--until-direct", "pb")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(PONG.fullmatch(ln) for ln in lines), lines
    assert PONG.fullmatch(lines[0]).group(3) is not None, lines      # first through DERP
    assert PONG.fullmatch(lines[-1]).group(3) is None, lines         # last one direct
    assert PONG.fullmatch(lines[0]).group(1) == b.status()["addresses"][0]
    # by IP and by FQDN too; -c bounds the count
    r = tsp("ping", "--state-dir", a.state_dir, "-c", "2", b.status()["addresses"][0])
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    r = tsp("ping", "--state-dir", a.state_dir, "-c", "1", "pb.tailnet.test")
    assert r.returncode == 0 and PONG.fullmatch(r.stdout.strip()).group(3) is None, r.stdout


def test_ping_errors(pair):
    a, b = pair
    r = tsp("ping", "--state-dir", a.state_dir, "nosuch")
    assert (r.returncode, r.stderr) == (1, "tsproxy: unknown peer 'nosuch' (not in the tailnet's netmap)\n")
    r = tsp("ping", "--state-dir", a.state_dir, "-c", "0", "pb")
    assert r.returncode == 2 and "usage: tsproxy ping" in r.stderr
    # a peer that stops answering (stopped, still online in the netmap): no pong, exit 1
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        r = tsp("ping", "--state-dir", a.state_dir, "-c", "2", "--timeout", "1", "pb")
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert r.returncode == 1
    assert re.fullmatch(r"(no pong from pb \(100\.64\.0\.\d+\) within 1 s\n){2}", r.stdout), r.stdout
    assert r.stderr == "tsproxy: no reply from pb after 2 pings\n"


def test_whois(pair):
    a, b = pair
    b_ip = b.status()["addresses"][0]
    r = tsp("whois", "--state-dir", a.state_dir, b_ip)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["name:      pb.tailnet.test", "user:      test@example.com",
                                     "tags:      -",
                                     f"addresses: {', '.join(b.status()['addresses'])}",
                                     "online:    yes"]
    r = tsp("whois", "--json", "--state-dir", a.state_dir, b.status()["addresses"][1])
    assert json.loads(r.stdout)["fqdn"] == "pb.tailnet.test"
    r = tsp("whois", "--state-dir", a.state_dir, a.status()["addresses"][0])
    assert "(this node)" in r.stdout.splitlines()[0]
    r = tsp("whois", "--state-dir", a.state_dir, "100.99.99.99")
    assert (r.returncode, r.stderr) == (1, "tsproxy: no node on the tailnet has the address 100.99.99.99\n")
    r = tsp("whois", "--state-dir", a.state_dir, "pb")
    assert (r.returncode, r.stderr) == (1, "tsproxy: 'pb' is not an IP address\n")


def test_netcheck(pair, tailnet):
    a, _ = pair
    r = tsp("netcheck", "--state-dir", a.state_dir)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"measuring DERP region 900 \(test900\) \[1/2\]\.\.\. \d+\.\d+ms\n"
                        r"measuring DERP region 901 \(test901\) \[2/2\]\.\.\. \d+\.\d+ms\n", r.stderr), r.stderr
    out = r.stdout
    assert "\t* UDP: true" in out
    assert re.search(r"\t\* IPv4: yes, 127\.0\.0\.1:\d+", out), out
    assert re.search(r"\t\* Nearest DERP: 90[01]", out), out
    assert re.search(r"\t\t- 900: \d+\.\d+ms", out) and re.search(r"\t\t- 901: \d+\.\d+ms", out)
    rep = json.loads(tsp("netcheck", "--json", "--state-dir", a.state_dir).stdout)
    assert rep["udp"] is True and rep["preferred_derp"] in (900, 901)
    assert set(rep["derp_latency_ms"]) == {"900", "901"}
    assert rep["home_derp"] in (900, 901)
    before = tailnet.call(lambda: sum(d.counters["stun_requests"] for d in tailnet.derps))
    assert before > 0                              # the answers came from our STUN servers


def test_netcheck_when_stun_is_silent(tmp_path):
    """A DERP map whose STUN servers never answer: UDP false, each region 'no answer'."""
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host="127.0.0.1", stun=False) as net:
        d = Daemon(str(tmp_path / "s"), ["--login-server", net.control_url, "--auth-key",
                                         net.auth_key, "--hostname", "silent", *BASE]).start(60)
        try:
            r = tsp("netcheck", "--state-dir", d.state_dir)
        finally:
            d.stop()
    assert r.returncode == 0, r.stderr
    assert "measuring DERP region 900 (test900) [1/1]... no answer" in r.stderr
    assert "\t* UDP: false" in r.stdout and "\t\t- 900: no answer (test900)" in r.stdout
