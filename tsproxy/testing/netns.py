"""Network namespaces for tests: unique names, collision-free /30s, cleanup by PID.

Every namespace gets only `lo` and the veths we give it, so nothing started inside can
reach anything but loopback and the test's own hosts; `assert_no_default_route` checks it.
Root-namespace veth addresses come from 10.231.0.0/16, allocated under an flock and checked
against the addresses already present, so parallel test runs never collide.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import time

POOL = ipaddress.ip_network("10.231.0.0/16")
LOCK_PATH = "/tmp/tsproxy-netns.lock"
_counter = itertools.count()


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def have_root() -> bool:
    return os.geteuid() == 0


def unique(prefix: str) -> str:
    """Short unique names (interface names are limited to 15 characters)."""
    return f"{prefix}{os.getpid() % 100000}{next(_counter)}"[:15]


def _addresses_in_use() -> set:
    out = run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    nets = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def allocate_subnet() -> ipaddress.IPv4Network:
    with open(LOCK_PATH, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        used = _addresses_in_use()
        start = (os.getpid() * 7 + next(_counter) * 13) % (POOL.num_addresses // 4)
        subnets = list(POOL.subnets(new_prefix=30))
        for i in range(len(subnets)):
            cand = subnets[(start + i) % len(subnets)]
            if not any(cand.overlaps(u) for u in used):
                return cand
    raise RuntimeError("no free /30 in the test pool")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


class Namespace:
    def __init__(self, prefix: str = "tspt"):
        self.name = unique(prefix)
        self.procs: list[subprocess.Popen] = []
        self.links: list[str] = []          # root-side interface names we created
        run(["ip", "netns", "add", self.name])
        self.exec(["ip", "link", "set", "lo", "up"])
        self.exec(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"], check=False)
        self.etc = f"/etc/netns/{self.name}"
        os.makedirs(self.etc, exist_ok=True)
        with open(f"{self.etc}/resolv.conf", "w") as f:
            f.write("nameserver 127.0.0.1\n")
        with open(f"{self.etc}/hosts", "w") as f:
            f.write("127.0.0.1 localhost\n::1 localhost\n")

    def exec(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *cmd], check=check, **kw)

    def spawn(self, cmd: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
        log = open(log_path, "ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True,
                             env={**os.environ, **(env or {})})
        log.close()
        self.procs.append(p)
        return p

    def veth_to_root(self) -> tuple[str, str, ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """A veth pair root<->namespace on a fresh /30: (root if, ns if, root ip, ns ip)."""
        net = allocate_subnet()
        root_ip, ns_ip = list(net.hosts())
        a, b = unique("tsr"), unique("tsn")
        run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        self.links.append(a)
        run(["ip", "link", "set", b, "netns", self.name])
        run(["ip", "addr", "add", f"{root_ip}/30", "dev", a])
        run(["ip", "link", "set", a, "up"])
        self.exec(["ip", "addr", "add", f"{ns_ip}/30", "dev", b])
        self.exec(["ip", "link", "set", b, "up"])
        self.assert_no_default_route()
        return a, b, root_ip, ns_ip

    def assert_no_default_route(self) -> None:
        for fam in ("-4", "-6"):
            out = self.exec(["ip", fam, "route", "show", "default"], check=False).stdout.strip()
            if out:
                raise RuntimeError(f"namespace {self.name} has a default route ({out}); refusing")

    def stop_processes(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        self.procs.clear()

    def close(self) -> None:
        self.stop_processes()
        run(["ip", "netns", "del", self.name], check=False)
        for link in self.links:
            run(["ip", "link", "del", link], check=False)   # normally gone with the namespace
        shutil.rmtree(self.etc, ignore_errors=True)


def veth_between(a: Namespace, b: Namespace) -> tuple[str, str, ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """A veth pair between two namespaces on a fresh /30: (if in a, if in b, ip in a, ip in b)."""
    net = allocate_subnet()
    ip_a, ip_b = list(net.hosts())
    ia, ib = unique("tsa"), unique("tsb")
    run(["ip", "link", "add", ia, "type", "veth", "peer", "name", ib])
    run(["ip", "link", "set", ia, "netns", a.name])
    run(["ip", "link", "set", ib, "netns", b.name])
    a.exec(["ip", "addr", "add", f"{ip_a}/30", "dev", ia])
    a.exec(["ip", "link", "set", ia, "up"])
    b.exec(["ip", "addr", "add", f"{ip_b}/30", "dev", ib])
    b.exec(["ip", "link", "set", ib, "up"])
    return ia, ib, ip_a, ip_b


def blackhole_default(ns: Namespace) -> None:
    """A default route into a veth whose both ends sit in `ns` with no addresses and no
    forwarding: sing-box insists on a default interface, and nothing sent there can leave."""
    ns.exec(["ip", "link", "add", "tspbh0", "type", "veth", "peer", "name", "tspbh1"])
    ns.exec(["ip", "link", "set", "tspbh0", "up"])
    ns.exec(["ip", "link", "set", "tspbh1", "up"])
    ns.exec(["sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])
    ns.exec(["ip", "route", "replace", "default", "dev", "tspbh0"])
    ns.exec(["ip", "-6", "route", "replace", "default", "dev", "tspbh0"], check=False)
    for fam in ("-4", "-6"):
        out = ns.exec(["ip", fam, "route", "show", "default"], check=False).stdout
        if any(line and "tspbh0" not in line for line in out.splitlines()):
            raise RuntimeError(f"unexpected default route in {ns.name}: {out}")
