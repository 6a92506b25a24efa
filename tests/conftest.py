"""Shared fixtures: a real wireguard-go peer in a namespace, and tsproxy daemons run through
the real CLI (`python -m tsproxy up --foreground`).

Network safety by construction (tests/README.md):
- test daemons get `--non-tailnet refuse` unless a test passes `--non-tailnet` itself (and then
  says `allow_direct=True` and points it at loopback);
- as root, every test daemon runs in a private mount namespace whose /etc/resolv.conf names a
  stub resolver on loopback (tsproxy/testing/stubdns.py) that logs and refuses: the host's
  resolver is never asked;
- `_egress_guard` fails a test whose daemons dialed from the host (`dialer.dial_direct`),
  handed a name to the host resolver (`dialer.host_resolve`) or sent the stub a query, unless
  the daemon was started with allow_direct / allow_host_resolve;
- `_nothing_left_behind` fails the run if a namespace, nft table or child process it created
  is still there at the end.
"""

import os
import signal
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
    """A tsproxy daemon started through the CLI in the foreground, stopped with `tsproxy down`.

    `--non-tailnet refuse` unless args say otherwise; allow_direct / allow_host_resolve let
    the guard accept host dials / host name lookups (only for tests pointing at loopback)."""

    live: "set[Daemon]" = set()            # started and not yet stopped (for the guards)
    violations: list[str] = []             # found by stop() before the guard ran

    def __init__(self, state_dir: str, args: list[str], *, allow_direct: bool = False,
                 allow_host_resolve: bool = False):
        self.state_dir = state_dir
        if "--non-tailnet" not in args:
            args = [*args, "--non-tailnet", "refuse"]
        self.args = args
        self.allow_direct = allow_direct
        self.allow_host_resolve = allow_host_resolve
        self.log_path = os.path.join(state_dir, "test-daemon.log")
        self.proc = None
        self.entry = ["-m", "tsproxy"]     # e.g. ["-m", "tsproxy.testing.fastrekey", "10"]

    def start(self, timeout: float = 20.0) -> "Daemon":
        """Running within `timeout`, or stopped (never left behind) and RuntimeError."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        log = open(self.log_path, "ab")
        cmd = [sys.executable, *self.entry, "up", "--foreground", "--state-dir", self.state_dir,
               *self.args]
        stub = stub_resolver()
        self.proc = subprocess.Popen(stub.wrap(cmd) if stub else cmd,
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO)
        log.close()
        Daemon.live.add(self)
        try:
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
        except BaseException:
            self.stop()
            raise

    def egress(self) -> list[str]:
        """What this daemon did on the host that it was not allowed to (empty: nothing)."""
        try:
            c = self.counters()
        except (ipc.DaemonNotRunning, OSError, ValueError, KeyError):
            return []
        bad = []
        if not self.allow_direct and c.get("dialer.dial_direct", 0):
            bad.append(f"{self.state_dir}: {c['dialer.dial_direct']} direct dial(s) from the host")
        if not self.allow_host_resolve and c.get("dialer.host_resolve", 0):
            bad.append(f"{self.state_dir}: {c['dialer.host_resolve']} name(s) given to the host resolver")
        return bad

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
        Daemon.live.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        Daemon.violations.extend(self.egress())
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

    def make(args, name="d", **allow):
        d = Daemon(str(tmp_path / name), args, **allow)
        started.append(d)              # recorded first: teardown stops it whatever start does
        return d.start()

    yield make
    for d in started:
        d.stop()


def pytest_configure(config):
    # SIGTERM unwinds like Ctrl-C, so fixtures, atexit hooks and finally blocks still remove
    # the namespaces, nft tables and processes of the run
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)


# --- the stub resolver every test daemon uses (root only: it needs a mount namespace) ---

_stub = None


def stub_resolver():
    """The run's StubResolver (created on first use), or None without root."""
    global _stub
    if _stub is None and os.geteuid() == 0:
        import atexit
        from tsproxy.testing.stubdns import StubResolver
        _stub = StubResolver()
        atexit.register(_stub.close)       # bench scripts use Daemon without the session fixture
    return _stub


@pytest.fixture(autouse=True)
def _egress_guard(request):
    """Fail the test if a daemon dialed from the host, used the host resolver or sent the stub
    resolver a query, unless that daemon was started with allow_direct / allow_host_resolve."""
    seen = len(_stub.queries) if _stub else 0
    Daemon.violations.clear()
    yield
    bad = list(Daemon.violations)
    Daemon.violations.clear()
    for d in list(Daemon.live):
        bad += d.egress()
    if _stub is not None and not any(d.allow_host_resolve for d in Daemon.live):
        queries = _stub.queries[seen:]
        if queries:
            bad.append(f"the stub resolver got {len(queries)} queries: {queries[:10]}")
    if bad:
        pytest.fail("traffic meant for the host's network:\n  " + "\n  ".join(bad), pytrace=False)


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc; zombies are reaped by their owner)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if rest[0] not in ("Z", "X"):
            kids.setdefault(int(rest[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        return "?"


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind():
    """At the end of the run: no namespace, nft table or child process of this run remains."""
    from tsproxy.testing import impair, netns
    yield
    for d in list(Daemon.live):            # a fixture that forgot one: stop it, then report
        d.stop()
    left = [f"egress after the last test: {v}" for v in Daemon.violations]
    global _stub
    if _stub is not None:
        _stub.close()
        _stub = None
    if os.geteuid() == 0:
        listed = netns.run(["ip", "netns", "list"], check=False).stdout.split()
        left += [f"namespace {n}" for n in sorted(netns.created & set(listed))]
        tables = netns.run(["nft", "list", "tables"], check=False).stdout
        left += [f"nft table {t}" for t in sorted(impair.created_tables) if t in tables.split()]
    deadline = time.monotonic() + 5        # children we just signalled may take a moment
    while (kids := _children(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.05)
    left += [f"process {p}: {_cmdline(p)}" for p in kids]
    for p in kids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "left behind by this run:\n  " + "\n  ".join(left)
