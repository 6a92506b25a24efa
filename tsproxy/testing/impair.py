"""Network impairment inside a test namespace (this kernel has no netem; see below).

    loss:  nftables `numgen random mod 1000 < N drop` on the WireGuard UDP port, both ways
    rate:  tc tbf bottleneck on an interface's egress

    drop_udp_between: nftables drop of UDP between two ports (both directions)
    reordering and duplication: no netem either, so udp_impair.py relays the datagrams instead

Everything lives in one nft table / the root qdisc of interfaces we name, so `clear`
removes exactly what we added.  Applied inside a namespace a test created, except
drop_udp_between, which may take ns=None for two of our own processes in the root namespace
(it matches only their two ports).
"""

from __future__ import annotations

from tsproxy.testing.peers import find_binary

import atexit
import os

TABLE = "tsploss"                   # only ever inside a namespace the test owns
# drop_udp_between may work in the root namespace: a name of this process, so parallel runs
# never share or delete each other's table; removed at exit if a caller forgot
PAIR_TABLE = f"tsp_udp_drop_{os.getpid()}"
created_tables: set[str] = set()    # root-namespace tables this process made (leftover checks)


def _exec(ns, cmd: list[str], check: bool = True, **kw):
    # `ns` is a netns.Namespace or anything with the same exec() (e.g. WireGuardPeer);
    # None is the root namespace
    if ns is None:
        import subprocess
        return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)
    return ns.exec(cmd, check=check, **kw)


def set_loss(ns, permille: int, port: int = 51820) -> None:
    """Drop `permille`/1000 of UDP datagrams to and from `port` in `ns`, each direction."""
    if not 0 <= permille <= 1000:
        raise ValueError("permille must be within 0..1000")
    clear_loss(ns)
    if permille == 0:
        return
    # numgen values are 0..999, so `< 1000` is out of range for nft: 1000 is a plain drop
    pick = "" if permille == 1000 else f"numgen random mod 1000 < {permille} "
    rules = (f"table inet {TABLE} {{\n"
             f" chain in {{ type filter hook input priority 0; policy accept;"
             f" udp dport {port} {pick}counter drop; }}\n"
             f" chain out {{ type filter hook output priority 0; policy accept;"
             f" udp sport {port} {pick}counter drop; }}\n"
             f"}}\n")
    _exec(ns, [find_binary("nft"), "-f", "-"], input=rules)


def loss_counters(ns) -> int:
    """Datagrams dropped so far by set_loss in `ns` (0 when no table is installed)."""
    out = _exec(ns, [find_binary("nft"), "list", "table", "inet", TABLE], check=False).stdout
    total = 0
    for line in out.splitlines():
        if "counter packets" in line:
            total += int(line.split("counter packets")[1].split()[0])
    return total


def clear_loss(ns) -> None:
    _exec(ns, [find_binary("nft"), "delete", "table", "inet", TABLE], check=False)


def set_rate(ns, ifname: str, mbit: float) -> None:
    """tbf bottleneck of `mbit` Mbit/s on `ifname`'s egress inside `ns`."""
    _exec(ns, ["tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", f"{mbit}mbit",
               "burst", "64kb", "latency", "50ms"])


def clear_rate(ns, ifname: str) -> None:
    _exec(ns, ["tc", "qdisc", "del", "dev", ifname, "root"], check=False)


def clear(ns, ifnames: tuple[str, ...] = ()) -> None:
    clear_loss(ns)
    for ifname in ifnames:
        clear_rate(ns, ifname)


def drop_udp_between(port_a: int, port_b: int, ns=None) -> None:
    """Drop every UDP datagram between the two ports, both ways (e.g. force two tailnet nodes
    onto their DERP relay)."""
    clear_udp_drop(ns)
    rules = (f"table inet {PAIR_TABLE} {{\n chain i {{ type filter hook input priority 0;\n"
             f"  udp sport {port_a} udp dport {port_b} drop;\n"
             f"  udp sport {port_b} udp dport {port_a} drop;\n }}\n}}\n")
    if ns is None:
        created_tables.add(PAIR_TABLE)
    _exec(ns, [find_binary("nft"), "-f", "-"], input=rules)


def clear_udp_drop(ns=None) -> None:
    _exec(ns, [find_binary("nft"), "delete", "table", "inet", PAIR_TABLE], check=False)


@atexit.register
def _clear_root_tables() -> None:
    for table in list(created_tables):
        _exec(None, [find_binary("nft"), "delete", "table", "inet", table], check=False)
