"""`tsproxy demo` through the real CLI, no root: it prints the commands that reach its demo peer,
each printed line works verbatim in a shell, and Ctrl-C stops it and removes its state."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.timeout(180)]


def _start_demo(*extra):
    p = subprocess.Popen([sys.executable, "-m", "tsproxy", "demo", *extra], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"demo exited {p.wait()}: {''.join(lines)} {p.stderr.read()}")
        lines.append(line)
        if line.startswith("Ctrl-C stops"):
            return p, lines
    p.kill()
    raise AssertionError(f"demo did not print its commands: {lines}")


def _sh(cmd, timeout=60):
    return subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_demo_prints_working_commands_and_cleans_up():
    port = free_port()
    p, lines = _start_demo("--listen", f"127.0.0.1:{port}")
    try:
        cmds = [ln.strip() for ln in lines if ln.startswith("  ") and not ln.startswith("  node")]
        curl = [c for c in cmds if c.startswith("curl --socks5-hostname")]
        assert curl == [f"curl --socks5-hostname 127.0.0.1:{port} http://demo-peer/"]
        state_dir = re.search(r"state dir (\S+)", "".join(lines)).group(1)
        assert os.stat(state_dir).st_mode & 0o077 == 0

        r = _sh(curl[0])
        assert r.returncode == 0 and "Hello from demo-peer" in r.stdout, r.stderr
        http = [c for c in cmds if c.startswith("curl --proxy")][0]
        assert "Hello from demo-peer" in _sh(http).stdout

        status = [c for c in cmds if " status " in c][0]
        r = _sh(status)
        assert r.returncode == 0, r.stderr
        assert "state:     Running (tailscale)" in r.stdout and "demo-peer" in r.stdout
        assert f"127.0.0.1:{port} (mixed)" in r.stdout

        ping = [c for c in cmds if " ping " in c][0]
        r = _sh(ping)
        assert r.returncode == 0, r.stderr
        pongs = r.stdout.splitlines()
        assert len(pongs) == 3 and all(
            # direct paths are this machine's own addresses (loopback or an interface address)
            re.fullmatch(r"pong from demo-peer \(100\.64\.0\.\d+\) via (DERP\(900\)|[0-9.]+:\d+|"
                         r"\[[0-9a-f:]+\]:\d+) in \d+ms", ln) for ln in pongs), pongs

        whois = [c for c in cmds if " whois " in c][0]
        r = _sh(whois)
        assert r.returncode == 0 and "demo-peer.tailnet.test" in r.stdout, r.stderr

        echo = [c for c in cmds if " nc " in c][0]
        r = _sh(echo)
        assert (r.returncode, r.stdout) == (0, "hello\n"), r.stderr
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert f"removed {os.path.dirname(state_dir)}" in out
    assert not os.path.exists(os.path.dirname(state_dir))
    assert "Traceback" not in err


def test_demo_port_in_use_is_one_line():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tsproxy", "demo", "--listen", f"127.0.0.1:{port}"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in r.stdout + r.stderr
