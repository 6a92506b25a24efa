"""The PAC file served at /proxy.pac: tunnel names and addresses go through the proxy, the rest
DIRECT, so a browser can reach the tailnet without routing all its traffic through us.  With an
exit node selected everything goes through the proxy (the exit node carries it), except
loopback and, with --exit-node-allow-lan-access, literal LAN addresses.  Built from the same
control.routing.RouteTable the dialer uses (from_table)."""

from __future__ import annotations

import ipaddress

TAILNET_NETS = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")


class PacConfig:
    def __init__(self, suffixes=(), networks=(), names=(), everything: bool = False,
                 direct_networks=()):
        self.suffixes = [s.strip(".").lower() for s in suffixes if s.strip(".")]
        nets = [ipaddress.ip_network(n, strict=False) for n in (*TAILNET_NETS, *networks)]
        self.networks = list(dict.fromkeys(n for n in nets if n.prefixlen > 0))
        self.names = [n.strip(".").lower() for n in names if n.strip(".")]
        self.everything = everything            # an exit node is selected
        self.direct_networks = [ipaddress.ip_network(n, strict=False) for n in direct_networks]

    @classmethod
    def from_table(cls, table) -> "PacConfig":
        from tsproxy.control.routing import LAN_RANGES
        exit_on = table.exit_node is not None
        return cls(suffixes=[*table.suffixes, *table.split_dns], networks=table.networks(),
                   names=sorted(n for n in table.names if "." not in n), everything=exit_on,
                   direct_networks=LAN_RANGES if exit_on and table.allow_lan else ())

    def update(self, other: "PacConfig") -> None:
        self.suffixes, self.networks, self.names = other.suffixes, other.networks, other.names
        self.everything, self.direct_networks = other.everything, other.direct_networks

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
        if self.everything:
            # the exit node carries the rest; the browser's own machine stays local
            lines.append('  if (host == "localhost" || dnsDomainIs(host, ".localhost")) return "DIRECT";')
            lines.append('  if (v4 && isInNet(host, "127.0.0.0", "255.0.0.0")) return "DIRECT";')
            lines.append('  if (host == "::1") return "DIRECT";')
            for n in self.direct_networks:
                if n.version == 4:
                    lines.append(f'  if (v4 && isInNet(host, "{n.network_address}", "{n.netmask}")) '
                                 'return "DIRECT";')
                else:
                    lines.append(f'  if (host.indexOf(":") >= 0 && typeof isInNetEx == "function" '
                                 f'&& isInNetEx(host, "{n}")) return "DIRECT";')
            lines += ['  return P;', "}", ""]
            return "\n".join(lines)
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
