"""The PAC file served at /proxy.pac: tunnel names and addresses go through the proxy, the rest
DIRECT, so a browser can reach the tailnet without routing all its traffic through us."""

from __future__ import annotations

import ipaddress

TAILNET_NETS = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")


class PacConfig:
    def __init__(self, suffixes=(), networks=(), names=()):
        self.suffixes = [s.strip(".").lower() for s in suffixes if s.strip(".")]
        nets = [ipaddress.ip_network(n, strict=False) for n in (*TAILNET_NETS, *networks)]
        self.networks = list(dict.fromkeys(n for n in nets if n.prefixlen > 0))
        self.names = [n.strip(".").lower() for n in names if n.strip(".")]

    def render(self, proxy_host: str, proxy_port: int) -> str:
        hp = f"[{proxy_host}]:{proxy_port}" if ":" in proxy_host else f"{proxy_host}:{proxy_port}"
        proxy = f"SOCKS5 {hp}; SOCKS {hp}; PROXY {hp}"
        lines = ["function FindProxyForURL(url, host) {",
                 f'  var P = "{proxy}";',
                 '  host = host.toLowerCase();',
                 '  if (host.charAt(0) == "[") host = host.substring(1, host.length - 1);']
        for name in self.names:
            lines.append(f'  if (host == "{_js(name)}") return P;')
        for s in self.suffixes:
            lines.append(f'  if (host == "{_js(s)}" || dnsDomainIs(host, ".{_js(s)}")) return P;')
        # only literal addresses are matched: resolving names here would leak them to the host DNS
        lines.append('  var v4 = /^\\d+\\.\\d+\\.\\d+\\.\\d+$/.test(host);')
        for n in self.networks:
            if n.version == 4:
                lines.append(f'  if (v4 && isInNet(host, "{n.network_address}", "{n.netmask}")) return P;')
            else:
                lines.append(f'  if (host.indexOf(":") >= 0 && typeof isInNetEx == "function" '
                             f'&& isInNetEx(host, "{n}")) return P;')
                lines.append(f'  if (host.indexOf(":") >= 0 && {_v6_prefix_test(n)}) return P;')
        lines += ['  return "DIRECT";', "}", ""]
        return "\n".join(lines)


def _js(s: str) -> str:
    return "".join(c for c in s if c.isalnum() or c in "-._")


def _v6_prefix_test(n) -> str:
    """A textual test for hosts written in the same compressed form (Chromium gives the
    canonical form); good enough for /48s like Tailscale's ULA range."""
    groups = n.network_address.exploded.split(":")[: n.prefixlen // 16]
    prefix = ":".join(g.lstrip("0") or "0" for g in groups) + ":"
    return f'host.indexOf("{prefix}") == 0'
