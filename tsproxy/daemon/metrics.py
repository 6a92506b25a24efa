"""`--metrics ADDR`: Prometheus text exposition on /metrics, liveness on /healthz, readiness on
/readyz (Running, logged in with a node key that has not expired, and at least one path up: the
DERP home connected or a direct path to a peer).

Everything comes from what the daemon already reports (`Daemon.status()`, the counters of every
component), so the numbers here and in `tsproxy status --json` are the same numbers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time

log = logging.getLogger("tsproxy.daemon.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


class _Out:
    def __init__(self):
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def metric(self, name: str, kind: str, help_text: str, samples) -> None:
        """samples: [(labels dict, value)]; a family is written once, even with no samples."""
        if name not in self._seen:
            self._seen.add(name)
            self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {float(value):g}" if lab else f"{name} {float(value):g}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _process(out: _Out) -> None:
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        out.metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                   [({}, rss)])
    except (OSError, ValueError, IndexError):
        pass
    try:
        out.metric("process_open_fds", "gauge", "Number of open file descriptors.",
                   [({}, len(os.listdir("/proc/self/fd")))])
    except OSError:
        pass


def _path_kind(path: str | None) -> str:
    if not path or path == "-":
        return "none"
    return "direct" if path.startswith("direct") else "derp"


def render(daemon) -> str:
    st = daemon.status()
    out = _Out()
    out.metric("tsproxy_info", "gauge", "Mode and state of this tsproxy (value 1).",
               [({"mode": st.get("mode"), "state": st.get("state")}, 1)])
    out.metric("tsproxy_uptime_seconds", "gauge", "Seconds since the daemon started.",
               [({}, st.get("uptime", 0))])
    peers = st.get("peers", [])
    out.metric("tsproxy_peer_bytes_total", "counter", "WireGuard payload bytes per peer and direction.",
               [({"peer": p["name"], "direction": d}, p.get(f"{d}_bytes", 0))
                for p in peers for d in ("rx", "tx")])
    out.metric("tsproxy_peer_packets_total", "counter",
               "Authenticated WireGuard datagrams per peer and direction.",
               [({"peer": p["name"], "direction": d}, p.get(f"{d}_packets", 0))
                for p in peers for d in ("rx", "tx")])
    if st.get("mode") == "tailscale":
        out.metric("tsproxy_peer_path_bytes_total", "counter",
                   "Bytes per peer, direction and path kind (udp = direct, derp = relayed).",
                   [({"peer": p["name"], "direction": d, "path": k}, p.get(f"{d}_{k}_bytes", 0))
                    for p in peers for d in ("rx", "tx") for k in ("udp", "derp")
                    if f"{d}_{k}_bytes" in p])
    out.metric("tsproxy_peer_handshakes_total", "counter", "Completed WireGuard handshakes per peer.",
               [({"peer": p["name"]}, p.get("handshakes", 0)) for p in peers])
    out.metric("tsproxy_peer_path", "gauge", "The path to each peer now (1 for the current kind).",
               [({"peer": p["name"], "kind": _path_kind(p.get("path") or p.get("endpoint"))}, 1)
                for p in peers])
    if st.get("mode") == "tailscale":
        out.metric("tsproxy_peer_online", "gauge", "1 if the netmap says the peer is online.",
                   [({"peer": p["name"]}, 1 if p.get("online") else 0) for p in peers])
    counters = st.get("counters", {})
    out.metric("tsproxy_events_total", "counter",
               "Every internal counter (drops by reason, dials, disco, ...), by component.",
               [({"component": k.rsplit(".", 1)[0], "counter": k.rsplit(".", 1)[-1]}, v)
                for k, v in sorted(counters.items())])
    _frontends(daemon, out)
    if daemon.tailnet is not None:
        _tailnet(daemon, st, out)
    _process(out)
    proc = st.get("process") or {}
    out.metric("tsproxy_asyncio_tasks", "gauge", "asyncio tasks alive in the daemon.",
               [({}, proc.get("asyncio_tasks", 0))])
    out.metric("tsproxy_udp_socket_buffer_bytes", "gauge",
               "Kernel buffer of the WireGuard UDP socket, as granted (Linux doubles the request).",
               [({"direction": k}, v) for k, v in (proc.get("udp_buffers") or {}).items()])
    return out.text()


def _frontends(daemon, out: _Out) -> None:
    samples, open_, total, failed = [], [], [], []
    for kind, srv in daemon.servers:
        for k, v in dict(getattr(srv, "counters", {}) or {}).items():
            if isinstance(v, (int, float)):
                samples.append(({"frontend": kind, "counter": k}, v))
        c = dict(getattr(srv, "counters", {}) or {})
        open_.append(({"frontend": kind}, getattr(srv, "open_connections", 0)))
        total.append(({"frontend": kind, "target": ""}, c.get("accepted", 0)))
        for reason in ("dial_failed", "auth_failed", "bad_request", "handshake_timeout"):
            if reason in c:
                failed.append(({"frontend": kind, "target": "", "reason": reason}, c[reason]))
    out.metric("tsproxy_proxy_events_total", "counter", "Proxy listener counters by front end.",
               samples)
    for fw in daemon.forwards.values():
        d = fw.describe()
        lab = {"frontend": f"forward {d['proto']}:{d['listen']}", "target": d["target"]}
        total.append((lab, d.get("connections", 0)))
        open_.append((lab, d.get("active", 0)))
        failed.append(({**lab, "reason": "dial"}, d.get("dial_failures", 0)))
    for rev in daemon.reverses:
        d = rev.describe()
        lab = {"frontend": f"reverse {d.get('proto', 'tcp')}:{d.get('tunnel_port')}",
               "target": d.get("target", "")}
        total.append((lab, d.get("connections", 0)))
    out.metric("tsproxy_connections_total", "counter", "Connections accepted per front end.",
               total)
    out.metric("tsproxy_connections_open", "gauge", "Connections open now per front end.", open_)
    out.metric("tsproxy_connections_failed_total", "counter",
               "Connections that failed, by front end and reason.", failed)


def _tailnet(daemon, st: dict, out: _Out) -> None:
    t = daemon.tailnet
    ctl = st.get("control") or {}
    out.metric("tsproxy_control_state", "gauge", "Control client state (1 for the current one).",
               [({"state": ctl.get("state")}, 1)])
    out.metric("tsproxy_control_failures", "gauge", "Consecutive failed control attempts.",
               [({}, ctl.get("failures") or 0)])
    nm = t.netmap
    expiry = nm.self_node.key_expiry if nm is not None else None
    if expiry is not None:
        out.metric("tsproxy_node_key_expiry_timestamp_seconds", "gauge",
                   "When our node key expires (Unix time).", [({}, expiry)])
    magic = t.magic
    derps = list(magic.derps.items()) if magic is not None else []
    out.metric("tsproxy_derp_connected", "gauge", "1 while the DERP connection to a region is up.",
               [({"region": r}, 1 if e.conn.connected.is_set() else 0) for r, e in derps])
    out.metric("tsproxy_derp_connects_total", "counter", "DERP connections made per region.",
               [({"region": r}, e.conn.counters.get("connects", 0)) for r, e in derps])
    out.metric("tsproxy_derp_reconnects_total", "counter",
               "DERP connections made again after one was lost, per region.",
               [({"region": r}, max(0, e.conn.counters.get("connects", 0) - 1)) for r, e in derps])
    out.metric("tsproxy_derp_home_region", "gauge", "Our DERP home region (0 = none).",
               [({}, (magic.home or 0) if magic is not None else 0)])


def readiness(daemon) -> tuple[bool, str]:
    """(ready, why): Running, logged in with a live node key, and at least one path up."""
    if daemon.state != "Running":
        return False, f"state {daemon.state}"
    t = daemon.tailnet
    if t is None:
        return True, "running"
    st = t.control.status()
    if st["state"] != "Running":
        return False, f"control {st['state']}" + (f": {st['last_error']}" if st.get("last_error") else "")
    if not t.control.connected:                        # between attempts: no control connection
        return False, f"control server unreachable ({st.get('last_error') or 'reconnecting'})"
    nm = t.netmap
    expiry = nm.self_node.key_expiry if nm is not None else None
    if expiry is not None and expiry <= time.time():
        return False, "node key expired"
    magic = t.magic
    if magic is None:
        return False, "no data plane yet"
    home = magic.derps.get(magic.home) if magic.home else None
    if home is not None and home.conn.connected.is_set():
        return True, f"DERP home {magic.home} connected"
    if any(ep.paths.best is not None for ep in magic.peers.values()):
        return True, "direct path up"
    return False, "no path up (DERP home not connected, no direct path)"


class MetricsServer:
    """A small HTTP/1.1 server: GET /metrics, /healthz, /readyz; one request per connection."""

    def __init__(self, daemon, host: str, port: int):
        self.daemon, self.host, self.port = daemon, host, port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=16 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def address_text(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def _serve(self, reader, writer) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1].split(b"?", 1)[0]) if len(parts) == 3 else (b"", b"")
            if method not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", "GET only\n", "text/plain"
            elif path == b"/metrics":
                status, body, ctype = "200 OK", render(self.daemon), CONTENT_TYPE
            elif path == b"/healthz":
                status, body, ctype = "200 OK", "ok\n", "text/plain"
            elif path == b"/readyz":
                ready, why = readiness(self.daemon)
                status = "200 OK" if ready else "503 Service Unavailable"
                body, ctype = f"{'ready' if ready else 'not ready'}: {why}\n", "text/plain"
            else:
                status, body, ctype = "404 Not Found", "try /metrics, /healthz or /readyz\n", "text/plain"
            data = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}"
                         f"\r\nConnection: close\r\n\r\n".encode() + (data if method != b"HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception:                     # a bug here must not take the daemon down
            log.exception("metrics request failed")
        finally:
            writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
