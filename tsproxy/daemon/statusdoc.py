"""The status document (`tsproxy status --json`, the IPC `status` call, `Node.status()`), built
in one place so the daemon and the Python API cannot drift apart in what they report."""

from __future__ import annotations

import os
import time


def merge_counters(sources) -> dict:
    """{"prefix.name": value} from [(prefix, object with a .counters dict)]; numbers only,
    summed when two sources share a prefix (e.g. several listeners of one kind)."""
    out: dict = {}
    for prefix, obj in sources:
        for k, v in dict(getattr(obj, "counters", None) or {}).items():
            if isinstance(v, (int, float)):
                key = f"{prefix}.{k}"
                out[key] = out.get(key, 0) + v
    return out


def status_document(*, state: str, started: float, addresses: list, servers, metrics: str | None,
                    forwards, reverses, peers: list, counters: dict, process: dict,
                    tailnet: dict | None = None, wireguard_port: int | None = None) -> dict:
    """`tailnet` is the tailnet's own status (self, control, auth_url, home_derp, magicsock,
    routing) in tailscale mode; without it the document describes plain WireGuard mode."""
    doc = {"ok": True, "state": state, "mode": "tailscale" if tailnet is not None else "wireguard",
           "pid": os.getpid(), "uptime": time.time() - started, "addresses": addresses}
    if tailnet is not None:
        for k in ("self", "control", "auth_url", "home_derp", "magicsock", "routing"):
            doc[k] = tailnet.get(k)
    else:
        doc["wireguard_port"] = wireguard_port
    doc.update({
        "listeners": [{"kind": kind, "address": srv.address_text()} for kind, srv in servers],
        "metrics": metrics,
        "forwards": [fw.describe() for fw in forwards],
        "reverse": [r.describe() for r in reverses],
        "peers": peers, "counters": counters, "process": process,
    })
    return doc
