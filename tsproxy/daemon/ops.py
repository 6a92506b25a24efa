"""Control-socket requests that look at the tailnet: ping, whois, netcheck.

Each handler takes the Daemon and the request dict and returns the response dict; the CLI
prints it.  Errors a user can act on come back as `{"ok": false, "error": "one line"}`.
"""

from __future__ import annotations

import ipaddress

from tsproxy.errors import TsproxyError

PING_TIMEOUT = 5.0


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
    then = ("dialed from this host" if policy == "direct" else "refused")
    return (f"{spec.host} is not a name on the tunnel now; connections to "
            f"{spec.host}:{spec.port} will be {then} until it is")


HANDLERS = {"ping": ping, "whois": whois}
