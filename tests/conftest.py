"""Shared fixtures: a real wireguard-go peer in a namespace, and tsproxy daemons run through
the real CLI (`python -m tsproxy up --foreground`)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tsproxy.daemon import ipc, statedir
from tsproxy.testing.peers import require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wg_peer(tmp_path_factory):
    require("wireguard-go", "wg")
    from tsproxy.testing.wgpeer import WireGuardPeer
    peer = WireGuardPeer(str(tmp_path_factory.mktemp("wgpeer"))).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def singbox_client(wg_peer):
    """sing-box (userspace WireGuard) in its own namespace, a second client of `wg_peer`
    (100.64.0.3); SOCKS5/HTTP on 127.0.0.1:11080 inside `singbox_client.ns`."""
    require("sing-box", "curl")
    from tsproxy.testing.singbox import SingBoxClient
    client = SingBoxClient(wg_peer).start()
    try:
        yield client
    finally:
        client.stop()


class Daemon:
    """A tsproxy daemon started through the CLI in the foreground, stopped with `tsproxy down`."""

    def __init__(self, state_dir: str, args: list[str]):
        self.state_dir = state_dir
        self.args = args
        self.log_path = os.path.join(state_dir, "test-daemon.log")
        self.proc = None

    def start(self, timeout: float = 20.0) -> "Daemon":
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tsproxy", "up", "--foreground",
                                      "--state-dir", self.state_dir, *self.args],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            try:
                if self.status().get("state") == "Running":
                    return self
            except (ipc.DaemonNotRunning, OSError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon not running after {timeout}s: {self.log()}")

    def status(self) -> dict:
        return ipc.call(statedir.socket_path(self.state_dir), {"op": "status"})

    def counters(self) -> dict:
        return self.status()["counters"]

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        try:
            ipc.call(statedir.socket_path(self.state_dir), {"op": "down"})
        except (ipc.DaemonNotRunning, OSError):
            self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return -9


@pytest.fixture
def daemon_factory(tmp_path):
    started = []

    def make(args, name="d"):
        d = Daemon(str(tmp_path / name), args).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()
