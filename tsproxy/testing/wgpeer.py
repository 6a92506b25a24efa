"""A real WireGuard peer for tests: wireguard-go (TUN) plus the Linux TCP stack in a namespace.

    root ns  <veth /30>  namespace: wireguard-go on wgX  100.64.0.2/32, fd7a:115c:a1e0::2/128
                                    routes 100.64.0.0/10 and fd7a:115c:a1e0::/48 via wgX
                                    servers.py on the tunnel and veth addresses

`client_conf()` writes the wg-quick file our side uses from the root namespace.  Also a small
CLI for people: `python -m tsproxy.testing.wgpeer up --state DIR` / `down --state DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from tsproxy.keys import NodePrivate
from tsproxy.testing import netns
from tsproxy.testing.peers import find_binary

PEER_IP4, PEER_IP6 = "100.64.0.2", "fd7a:115c:a1e0::2"
CLIENT_IP4, CLIENT_IP6 = "100.64.0.1", "fd7a:115c:a1e0::1"
WG_PORT = 51820
_SYS_PIDFD_GETFD = 438          # x86_64 and aarch64 alike (asm-generic)
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33
MTU = 1420
DNS_NAME = "peer.tunnel.test"


class WireGuardPeer:
    def __init__(self, workdir: str | None = None, *, name: str = "tsp-peer"):
        self.workdir = workdir or tempfile.mkdtemp(prefix="tspeer-")
        os.makedirs(self.workdir, exist_ok=True)
        self.name = name
        self.key = NodePrivate.generate()
        self.client_key = NodePrivate.generate()
        self.ns: netns.Namespace | None = None
        self.ifname = netns.unique("tswg")
        self.extra_clients: list = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "WireGuardPeer":
        self.ns = ns = netns.Namespace("tspp")
        try:
            self.root_if, self.ns_if, self.root_ip, self.veth_ip = ns.veth_to_root()
            self._start_wireguard()
            self.servers = ns.spawn(
                [sys.executable, "-m", "tsproxy.testing.servers", "--bind", PEER_IP4, "--bind", PEER_IP6,
                 "--bind", str(self.veth_ip), "--name", self.name,
                 "--dns", f"{DNS_NAME}={PEER_IP4}", "--dns", f"{DNS_NAME}={PEER_IP6}"],
                os.path.join(self.workdir, "servers.log"),
                env={"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))})
            for _ in range(200):
                if "ready" in self._log("servers.log"):
                    break
                if self.servers.poll() is not None:
                    raise RuntimeError(f"test servers exited: {self._log('servers.log')}")
                time.sleep(0.05)
            else:
                raise RuntimeError("test servers did not start")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_wireguard(self) -> None:
        """wireguard-go on a fresh TUN with our key, addresses and routes (start and restart)."""
        wggo = find_binary("wireguard-go")
        wg = find_binary("wg")
        ns = self.ns
        keyfile = os.path.join(self.workdir, "peer.key")
        with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.key.b64() + "\n")
        sock = f"/var/run/wireguard/{self.ifname}.sock"
        self.wg_proc = ns.spawn([wggo, "-f", self.ifname], os.path.join(self.workdir, "wireguard-go.log"),
                                env={"LOG_LEVEL": "error", "WG_PROCESS_FOREGROUND": "1"})
        for _ in range(100):
            if os.path.exists(sock):
                break
            if self.wg_proc.poll() is not None:
                raise RuntimeError(f"wireguard-go exited: {self._log('wireguard-go.log')}")
            time.sleep(0.05)
        else:
            raise RuntimeError("wireguard-go did not create its UAPI socket")
        ns.exec([wg, "set", self.ifname, "private-key", keyfile, "listen-port", str(WG_PORT),
                 "peer", self.client_key.public().b64(),
                 "allowed-ips", f"{CLIENT_IP4}/32,{CLIENT_IP6}/128"])
        for public_b64, ip4, ip6 in self.extra_clients:
            ns.exec([wg, "set", self.ifname, "peer", public_b64, "allowed-ips", f"{ip4}/32,{ip6}/128"])
        ns.exec(["ip", "addr", "add", f"{PEER_IP4}/32", "dev", self.ifname])
        ns.exec(["ip", "-6", "addr", "add", f"{PEER_IP6}/128", "dev", self.ifname, "nodad"])
        ns.exec(["ip", "link", "set", self.ifname, "mtu", str(MTU), "up"])
        ns.exec(["ip", "route", "add", "100.64.0.0/10", "dev", self.ifname])
        ns.exec(["ip", "-6", "route", "add", "fd7a:115c:a1e0::/48", "dev", self.ifname])
        ns.assert_no_default_route()

    def kill_wireguard(self, timeout: float = 10.0) -> None:
        """SIGKILL wireguard-go by PID (its TUN, addresses and sessions vanish with it)."""
        import signal
        proc = self.wg_proc
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while self.ns.exec(["ip", "link", "show", self.ifname], check=False).returncode == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.ifname} still exists after wireguard-go died")
            time.sleep(0.05)
        try:
            os.unlink(f"/var/run/wireguard/{self.ifname}.sock")
        except FileNotFoundError:
            pass

    def set_socket_buffers(self, size: int) -> int:
        """Give wireguard-go's UDP socket(s) `size`-byte receive and send buffers, as current
        wireguard-go (>= 0.0.20230223) asks for itself (7 MiB); Debian's 0.0.20220316 keeps the
        kernel default (208 KiB), which `net.core.rmem_default` cannot raise from inside its
        namespace.  Done from outside (root): the socket is borrowed with pidfd_getfd(2), the
        options set on the shared socket, the borrowed descriptor closed.  Returns how many
        sockets were changed."""
        import ctypes
        import socket
        pid = self.wg_proc.pid
        inodes = set()
        for table in ("udp", "udp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                for line in f.read().splitlines()[1:]:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == WG_PORT:
                        inodes.add(fields[9])
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(pid)
        changed = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if not (link.startswith("socket:[") and link[8:-1] in inodes):
                    continue
                borrowed = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
                if borrowed < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd on wireguard-go's socket")
                s = socket.socket(fileno=borrowed)
                try:
                    s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
                    s.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, size)
                finally:
                    s.close()
                changed += 1
        finally:
            os.close(pidfd)
        if not changed:
            raise RuntimeError(f"no UDP socket on port {WG_PORT} in wireguard-go (pid {pid})")
        return changed

    def restart_wireguard(self) -> None:
        """Kill wireguard-go and start a new one with the same keys: every session is lost, the
        peer no longer knows our endpoint, so our side must handshake again."""
        self.kill_wireguard()
        self._start_wireguard()

    def stop(self) -> None:
        if self.ns is not None:
            self.ns.close()
            self.ns = None
        try:
            os.unlink(f"/var/run/wireguard/{self.ifname}.sock")
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _log(self, name: str) -> str:
        try:
            with open(os.path.join(self.workdir, name), errors="replace") as f:
                return f.read()[-2000:]
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ configuration
    @property
    def endpoint(self) -> str:
        return f"{self.veth_ip}:{WG_PORT}"

    def client_conf(self, *, psk: bytes | None = None, keepalive: int = 0, dns: bool = False,
                    extra_peers: str = "") -> str:
        lines = ["[Interface]", f"PrivateKey = {self.client_key.b64()}",
                 f"Address = {CLIENT_IP4}/32, {CLIENT_IP6}/128", f"MTU = {MTU}"]
        if dns:
            lines.append(f"DNS = {PEER_IP4}, tunnel.test")
        lines += ["", "[Peer]", f"PublicKey = {self.key.public().b64()}", f"Endpoint = {self.endpoint}",
                  "AllowedIPs = 100.64.0.0/10, fd7a:115c:a1e0::/48"]
        if psk is not None:
            import base64
            lines.append(f"PresharedKey = {base64.b64encode(psk).decode()}")
            self.set_psk(psk)
        if keepalive:
            lines.append(f"PersistentKeepalive = {keepalive}")
        return "\n".join(lines) + "\n" + extra_peers

    def write_client_conf(self, path: str | None = None, **kw) -> str:
        path = path or os.path.join(self.workdir, "client.conf")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.client_conf(**kw))
        return path

    def set_psk(self, psk: bytes) -> None:
        import base64
        pskfile = os.path.join(self.workdir, "psk")
        with open(os.open(pskfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(base64.b64encode(psk).decode() + "\n")
        self.ns.exec([find_binary("wg"), "set", self.ifname, "peer", self.client_key.public().b64(),
                      "preshared-key", pskfile])

    def add_client(self, public_b64: str, ip4: str, ip6: str) -> None:
        self.extra_clients.append((public_b64, ip4, ip6))     # restart_wireguard re-adds them
        self.ns.exec([find_binary("wg"), "set", self.ifname, "peer", public_b64,
                      "allowed-ips", f"{ip4}/32,{ip6}/128"])

    def wg_dump(self) -> list[dict]:
        """`wg show dump` peers: public key, endpoint, latest handshake (unix), rx, tx."""
        out = self.ns.exec([find_binary("wg"), "show", self.ifname, "dump"]).stdout.splitlines()
        peers = []
        for line in out[1:]:
            f = line.split("\t")
            peers.append({"public_key": f[0], "endpoint": f[2], "latest_handshake": int(f[4]),
                          "rx": int(f[5]), "tx": int(f[6])})
        return peers

    def exec(self, cmd: list[str], check: bool = True, **kw):
        return self.ns.exec(cmd, check=check, **kw)


STATE_FILE = "state.json"


def _state_path(state: str) -> str:
    return os.path.join(state, STATE_FILE)


def _up(state: str) -> int:
    import signal
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    # blocked before start(): a signal during start-up waits until start() has finished (or
    # cleaned up after itself) and then tears the peer down, instead of killing us halfway
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    peer = WireGuardPeer(state).start()
    try:
        conf = peer.write_client_conf(dns=True)
        info = {"client_conf": conf, "peer": PEER_IP4, "peer6": PEER_IP6, "client": CLIENT_IP4,
                "client6": CLIENT_IP6, "endpoint": peer.endpoint, "namespace": peer.ns.name,
                "root_if": peer.root_if, "ifname": peer.ifname, "pid": os.getpid(), "pids": peer.ns.pids(),
                "dns_name": DNS_NAME}
        tmp = _state_path(state) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, _state_path(state))
        print(json.dumps(info), flush=True)
        signal.sigwait(sigs)
    finally:
        peer.stop()
        try:
            os.unlink(_state_path(state))
        except FileNotFoundError:
            pass
    return 0


def _down(state: str, timeout: float = 15.0) -> int:
    """Stop the `up` process recorded in DIR; if it died, clean its leftovers by PID/name."""
    import signal
    try:
        with open(_state_path(state)) as f:
            info = json.load(f)
    except FileNotFoundError:
        print(f"no peer running for {state}", file=sys.stderr)
        return 1
    holder = int(info["pid"])
    if netns.alive(holder):
        os.kill(holder, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while netns.alive(holder) and time.monotonic() < deadline:
            time.sleep(0.05)
    if netns.alive(holder):
        print(f"peer process {holder} did not exit", file=sys.stderr)
        return 1
    # The holder tears everything down itself; these only matter if it was SIGKILLed.
    for pid in info.get("pids", []):
        if netns.alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    netns.run(["ip", "netns", "del", info["namespace"]], check=False)
    netns.run(["ip", "link", "del", info["root_if"]], check=False)
    shutil.rmtree(f"/etc/netns/{info['namespace']}", ignore_errors=True)
    if info.get("ifname"):
        try:
            os.unlink(f"/var/run/wireguard/{info['ifname']}.sock")
        except FileNotFoundError:
            pass
    try:
        os.unlink(_state_path(state))
    except FileNotFoundError:
        pass
    print("peer stopped", flush=True)
    return 0


def _detach(state: str, timeout: float = 30.0) -> int:
    import subprocess
    os.makedirs(state, exist_ok=True)
    log = open(os.path.join(state, "up.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tsproxy.testing.wgpeer", "up", "--state", state],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(_state_path(state)):
            with open(_state_path(state)) as f:
                print(f.read(), flush=True)
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    with open(os.path.join(state, "up.log"), errors="replace") as f:
        print(f"peer did not come up:\n{f.read()[-2000:]}", file=sys.stderr)
    if proc.poll() is None:
        proc.terminate()
    return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tsproxy.testing.wgpeer",
                                description="Run a real WireGuard peer (wireguard-go) in a network namespace. "
                                            "`up` prints one JSON line (client_conf path, addresses) and "
                                            "stays in the foreground until SIGTERM/SIGINT or `down`.")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--state", required=True, help="directory for keys, logs, client.conf and state.json")
    p.add_argument("--detach", action="store_true", help="with up: return once the peer is ready")
    a = p.parse_args(argv)
    if a.action == "down":
        return _down(a.state)
    return _detach(a.state) if a.detach else _up(a.state)


# Compatibility: loss helpers now live in impair.py.
def set_loss(peer: WireGuardPeer, permille: int) -> None:
    """Drop `permille`/1000 of WireGuard datagrams each way at the peer (nftables numgen)."""
    from tsproxy.testing import impair
    impair.set_loss(peer, permille, WG_PORT)


def loss_counters(peer: WireGuardPeer) -> int:
    from tsproxy.testing import impair
    return impair.loss_counters(peer)


def clear_loss(peer: WireGuardPeer) -> None:
    from tsproxy.testing import impair
    impair.clear_loss(peer)


if __name__ == "__main__":
    sys.exit(main())
