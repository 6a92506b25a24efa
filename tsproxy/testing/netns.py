"""Network namespaces for tests: unique names, collision-free /30s, cleanup by PID.

Every namespace gets only `lo` and the veths we give it, so nothing started inside can
reach anything but loopback and the test's own hosts; `assert_no_default_route` checks it.
Veth addresses come from 10.231.0.0/16, allocated under an flock, checked against the
addresses already present in the root namespace and recorded in a registry file
(subnet + owner PID, entries of dead PIDs pruned), so parallel test runs never collide even
between choosing a /30 and configuring it.  Every Namespace still open at interpreter exit
is torn down by an atexit hook.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import time

POOL = ipaddress.ip_network("10.231.0.0/16")
LOCK_PATH = "/tmp/tsproxy-netns.lock"
REGISTRY_PATH = "/tmp/tsproxy-netns.registry"
_counter = itertools.count()
_open: "set[Namespace]" = set()
created: set[str] = set()          # every namespace this process made (for leftover checks)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def stop_group(proc, grace: float = 10.0) -> None:
    """Stop a process started in its own group (start_new_session): SIGTERM to the group, then
    SIGKILL when it has not exited within `grace` seconds.  By PID, never by name."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def have_root() -> bool:
    return os.geteuid() == 0


def unique(prefix: str) -> str:
    """Short unique names (interface names are limited to 15 characters): the PID in fixed-width
    base 36 (so pid 12 + counter 3 never equals pid 1 + counter 23), then a per-process counter."""
    name = f"{prefix}{_b36(os.getpid()).rjust(5, '0')}{_b36(next(_counter))}"
    if len(name) > 15:
        raise ValueError(f"name {name!r} longer than 15 characters; use a shorter prefix")
    return name


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def _addresses_in_use() -> set:
    out = run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    nets = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def _read_registry() -> dict[str, int]:
    try:
        with open(REGISTRY_PATH) as f:
            data = json.load(f)
        return {str(k): int(v) for k, v in data.items()}
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


def _write_registry(reg: dict[str, int]) -> None:
    tmp = f"{REGISTRY_PATH}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(reg, f)
    os.replace(tmp, REGISTRY_PATH)


def allocate_subnet(owner: int | None = None) -> ipaddress.IPv4Network:
    """A /30 from POOL that no live registrant holds and no root-namespace address overlaps.

    The registry entry (owned by `owner`, default this process) stays until
    `release_subnet` or until the owner dies."""
    owner = os.getpid() if owner is None else owner
    with open(LOCK_PATH, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        reg = {net: pid for net, pid in _read_registry().items() if alive(pid)}
        taken, wide = set(), []           # /30s in the pool; anything wider that overlaps it
        for u in _addresses_in_use() | {ipaddress.ip_network(n) for n in reg}:
            if u.version != 4 or not u.overlaps(POOL):
                continue
            if u.prefixlen >= 30:
                taken.add(u.supernet(new_prefix=30))
            else:
                wide.append(u)
        subnets = list(POOL.subnets(new_prefix=30))
        start = (os.getpid() * 7 + next(_counter) * 13) % len(subnets)
        for i in range(len(subnets)):
            cand = subnets[(start + i) % len(subnets)]
            if cand not in taken and not any(cand.overlaps(u) for u in wide):
                reg[str(cand)] = owner
                _write_registry(reg)
                return cand
    raise RuntimeError("no free /30 in the test pool")


def release_subnet(net: ipaddress.IPv4Network) -> None:
    with open(LOCK_PATH, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        reg = _read_registry()
        if reg.pop(str(net), None) is not None:
            _write_registry(reg)


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
        self.subnets: list[ipaddress.IPv4Network] = []
        self.etc = f"/etc/netns/{self.name}"
        run(["ip", "netns", "add", self.name])
        created.add(self.name)
        _open.add(self)
        try:
            self.exec(["ip", "link", "set", "lo", "up"])
            self.exec(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"], check=False)
            os.makedirs(self.etc, exist_ok=True)
            with open(f"{self.etc}/resolv.conf", "w") as f:
                f.write("nameserver 127.0.0.1\n")
            with open(f"{self.etc}/hosts", "w") as f:
                f.write("127.0.0.1 localhost\n::1 localhost\n")
        except BaseException:
            self.close()
            raise

    def exec(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *cmd], check=check, **kw)

    run = exec      # the name the task brief uses

    def spawn(self, cmd: list[str], log_path: str | None = None, env: dict | None = None) -> subprocess.Popen:
        """Start cmd inside the namespace in its own session; stopped by PID in close()."""
        log = open(log_path or os.devnull, "ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True,
                             env={**os.environ, **(env or {})})
        log.close()
        self.procs.append(p)
        return p

    def veth_to_root(self) -> tuple[str, str, ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """A veth pair root<->namespace on a fresh /30: (root if, ns if, root ip, ns ip)."""
        net = allocate_subnet()
        self.subnets.append(net)
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
        """Every process started with spawn(): SIGTERM to each group, SIGKILL after 5 s."""
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

    def pids(self) -> list[int]:
        """PIDs of processes we spawned that are still running."""
        return [p.pid for p in self.procs if p.poll() is None]

    def close(self) -> None:
        """Idempotent; safe after partial setup or failures."""
        try:
            self.stop_processes()
        finally:
            run(["ip", "netns", "del", self.name], check=False)
            for link in self.links:
                run(["ip", "link", "del", link], check=False)   # normally gone with the namespace
            self.links.clear()
            shutil.rmtree(self.etc, ignore_errors=True)
            for net in self.subnets:
                release_subnet(net)
            self.subnets.clear()
            _open.discard(self)

    def __enter__(self) -> "Namespace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for ns in list(_open):
        ns.close()


def veth_between(a: Namespace, b: Namespace) -> tuple[str, str, ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """A veth pair between two namespaces on a fresh /30: (if in a, if in b, ip in a, ip in b)."""
    net = allocate_subnet()
    a.subnets.append(net)
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
