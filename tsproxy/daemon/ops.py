"""Control-socket requests that look at the tailnet: ping, whois, netcheck.

Each handler takes the Daemon and the request dict and returns the response dict; the CLI
prints it.  Errors a user can act on come back as `{"ok": false, "error": "one line"}`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os

from tsproxy.disco import stun
from tsproxy.errors import TsproxyError

PING_TIMEOUT = 5.0
STUN_TRIES, STUN_WAIT = 3, 0.7          # a region gets three chances to answer, 0.7 s apart


def _tailnet(daemon, what: str):
    t = daemon.tailnet
    if t is None:
        raise TsproxyError(f"{what} needs Tailscale mode (plain WireGuard has no netmap)")
    if t.netmap is None:
        raise TsproxyError(f"{what}: not connected to the tailnet yet (see 'tsproxy status')")
    return t


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def find_node(nm, host: str):
    """A peer (or ourselves) by MagicDNS name, FQDN or tailnet address; None if unknown."""
    ip = _ip(host)
    wanted = {ip} if ip is not None else {
        _ip(str(a)) for a in nm.names.get(host.strip().rstrip(".").lower(), [])}
    if not wanted:
        return None
    for node in [nm.self_node, *nm.peers.values()]:
        if any(a.network_address in wanted for a in node.addresses):
            return node
    return None


def _describe(nm, node) -> dict:
    profile = nm.user_profiles.get(node.user) or {}
    return {"name": node.short_name(nm.magicdns_suffix) or node.name.rstrip("."),
            "fqdn": node.name.rstrip("."),
            "addresses": [str(a.network_address) for a in node.addresses],
            "user": profile.get("LoginName") or profile.get("DisplayName") or None,
            "tags": list(node.tags), "online": node.online, "expired": node.expired,
            "self": node is nm.self_node}


async def ping(daemon, req: dict) -> dict:
    t = _tailnet(daemon, "ping")
    host = str(req.get("host", ""))
    nm = t.netmap
    node = find_node(nm, host)
    if node is None:
        return {"ok": False, "error": f"unknown peer {host!r} (not in the tailnet's netmap)"}
    info = _describe(nm, node)
    if info["self"]:
        return {"ok": False, "error": f"{host} is this node"}
    if node.online is False:
        return {"ok": False, "error": f"{info['name']} is offline", "offline": True}
    if node.expired:
        return {"ok": False, "error": f"{info['name']}'s node key has expired"}
    if node.key is None or node.disco_key is None:
        return {"ok": False, "error": f"{info['name']} has no disco key; it cannot be pinged"}
    timeout = req.get("timeout", PING_TIMEOUT)
    timeout = float(timeout) if isinstance(timeout, (int, float)) and 0 < timeout <= 60 else PING_TIMEOUT
    r = await t.magic.ping(node.key, timeout)
    out = {"ok": True, "name": info["name"], "ip": info["addresses"][0] if info["addresses"] else "",
           "pong": r is not None}
    if r is not None:
        latency, via = r
        out.update(latency_ms=round(latency * 1000, 2), via=via, direct=not via.startswith("DERP("))
    return out


async def whois(daemon, req: dict) -> dict:
    t = _tailnet(daemon, "whois")
    text = str(req.get("ip", ""))
    if _ip(text) is None:
        return {"ok": False, "error": f"{text!r} is not an IP address"}
    node = find_node(t.netmap, text)
    if node is None:
        return {"ok": False, "error": f"no node on the tailnet has the address {text}"}
    return {"ok": True, **_describe(t.netmap, node)}


def offline_reason(daemon, host: str) -> str | None:
    """'peer-x is offline' when the netmap says so: say it at once instead of a dial timeout."""
    t = daemon.tailnet
    if t is None or t.netmap is None:
        return None
    node = find_node(t.netmap, host)
    if node is None or node is t.netmap.self_node:
        return None
    name = node.short_name(t.netmap.magicdns_suffix) or host
    if node.online is False:
        return f"{name} is offline"
    if node.expired:
        return f"{name}'s node key has expired"
    return None


async def forward_warning(daemon, spec) -> str | None:
    """A forward to a name that does not resolve now is allowed (the peer may join later), but
    the user hears about it when adding it, not only from failing connections."""
    if _ip(spec.host) is not None:
        return None
    try:
        kind, _ = await daemon.dialer.route(spec.host)
    except TsproxyError:
        kind = "outside"
    if kind == "tunnel":
        return None
    policy = getattr(daemon.dialer, "policy", "direct")
    table = getattr(daemon.dialer, "table", None)
    exit_on = getattr(table, "exit_node", None) is not None
    then = ("dialed from this host" if policy == "direct" and not exit_on else "refused")
    return (f"{spec.host} is not a name on the tunnel now; connections to "
            f"{spec.host}:{spec.port} will be {then} until it is")


# -- netcheck: the CLI asks for the regions, then measures them one by one (its progress) ----------

def _derp_map(daemon):
    t = _tailnet(daemon, "netcheck")
    dm = t.netmap.derp_map
    if dm is None or not dm.regions:
        raise TsproxyError("netcheck: the tailnet's DERP map has no regions")
    return t, dm


async def netcheck_regions(daemon, req: dict) -> dict:
    t, dm = _derp_map(daemon)
    home = t.magic.home if t.magic is not None else None
    return {"ok": True, "home": home or None, "regions": [
        {"id": rid, "code": r.region_code, "name": r.region_name}
        for rid, r in sorted(dm.regions.items())]}


class _StunProbe(asyncio.DatagramProtocol):
    def __init__(self):
        self.waiters: dict[bytes, asyncio.Future] = {}

    def datagram_received(self, data, addr):
        r = stun.parse_response(data)
        fut = self.waiters.get(r[0]) if r is not None else None
        if fut is not None and not fut.done():
            fut.set_result(r[1])


def _stun_targets(region) -> dict:
    """family -> (ip, port) of the region's first node with a STUN address of that family."""
    out = {}
    for node in region.nodes:
        if node.stun_port is not None and node.stun_port < 0:
            continue
        port = node.stun_port or 3478
        for fam, ip in (("v4", node.ipv4), ("v6", node.ipv6), ("v4", node.host_name),
                        ("v6", node.host_name)):
            a = _ip(ip or "")
            if a is not None and ("v4" if a.version == 4 else "v6") == fam:
                out.setdefault(fam, (str(a), port))
    return out


async def _stun(ip: str, port: int) -> dict | None:
    """STUN from a fresh socket: -> {"latency_ms", "mapped"} or None (no answer, no route)."""
    loop = asyncio.get_running_loop()
    try:
        tr, proto = await loop.create_datagram_endpoint(_StunProbe, remote_addr=(ip, port))
    except OSError:
        return None                      # e.g. no IPv6 route on this host
    try:
        for _ in range(STUN_TRIES):
            txid, fut = os.urandom(12), loop.create_future()
            proto.waiters[txid] = fut
            sent = loop.time()
            try:
                tr.sendto(stun.build_request(txid))
                mapped = await asyncio.wait_for(fut, STUN_WAIT)
            except (TimeoutError, OSError):
                continue
            host, mport = mapped
            return {"latency_ms": round((loop.time() - sent) * 1000, 2),
                    "mapped": f"[{host}]:{mport}" if ":" in host else f"{host}:{mport}"}
        return None
    finally:
        tr.close()


async def netcheck_probe(daemon, req: dict) -> dict:
    _, dm = _derp_map(daemon)
    region = dm.regions.get(req.get("region"))
    if region is None:
        return {"ok": False, "error": f"no DERP region {req.get('region')!r} in the map"}
    targets = _stun_targets(region)
    results = await asyncio.gather(*(_stun(*targets[f]) if f in targets else _none()
                                     for f in ("v4", "v6")))
    return {"ok": True, "region": region.region_id, "v4": results[0], "v6": results[1],
            "stun_targets": sorted(targets)}


async def _none():
    return None


HANDLERS = {"ping": ping, "whois": whois, "netcheck.regions": netcheck_regions,
            "netcheck.probe": netcheck_probe}
