"""Sans-IO proxy choice and HTTP CONNECT framing (the rules of Go's x/net/http/httpproxy,
which tailscaled's tshttpproxy uses for control and DERP).

    cfg = ProxyConfig.from_env(os.environ)
    proxy = cfg.proxy_for("https", "derp1.example.com", 443)   # ProxyURL or None
    sock.send(connect_request("derp1.example.com", 443, proxy)); check_connect_response(head)

Rules: https targets use HTTPS_PROXY (or https_proxy), http targets HTTP_PROXY (or http_proxy);
upper case wins over lower case; a proxy without a scheme is `http://`.  NO_PROXY (or no_proxy)
is a comma list of "*", IPs, CIDRs, and domains ("example.com" and ".example.com" both match
the domain and its subdomains; "*.example.com" is ".example.com"), each optionally with ":port".
"localhost" and loopback addresses never use a proxy.  Credentials in the proxy URL become a
Basic Proxy-Authorization header; ProxyURL's repr and `display` never show them.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from tsproxy.errors import ConfigError, RemoteProtocolError

MAX_CONNECT_RESPONSE = 16 << 10


@dataclass(frozen=True)
class ProxyURL:
    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)  # "Basic ..." header value

    @property
    def display(self) -> str:
        """host:port for logs and errors (never the credentials)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, source: str) -> "ProxyURL":
        raw = text.strip()
        if "://" not in raw:
            raw = "http://" + raw
        try:
            u = urlsplit(raw)
            port = u.port
        except ValueError:
            raise ConfigError(f"{source} is not a valid proxy URL") from None
        if u.scheme != "http":
            raise ConfigError(f"{source}: only http:// proxies (HTTP CONNECT) are supported, "
                              f"not {u.scheme}://")
        if not u.hostname:
            raise ConfigError(f"{source} has no proxy host")
        auth = None
        if u.username is not None:
            cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
            auth = "Basic " + base64.b64encode(cred).decode()
        return cls(u.hostname, port or 80, auth)


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


class _NoProxy:
    def __init__(self, text: str):
        self.all = False
        self.nets: list = []
        self.ips: list = []                       # (ip, port or None)
        self.domains: list = []                   # (".suffix", port or None)
        for entry in (e.strip().lower() for e in text.split(",")):
            if not entry:
                continue
            if entry == "*":
                self.all = True
                continue
            if "/" in entry:
                try:
                    self.nets.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    pass                          # not a CIDR: ignored, as Go does
                continue
            host, port = _split_host_port(entry)
            try:
                self.ips.append((ipaddress.ip_address(host), port))
                continue
            except ValueError:
                pass
            if host.startswith("*."):
                host = host[1:]
            if not host.startswith("."):
                host = "." + host
            self.domains.append((host, port))

    def bypass(self, host: str, port: int) -> bool:
        if self.all:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None:
            return (any(ip in n for n in self.nets)
                    or any(ip == i and p in (None, port) for i, p in self.ips))
        h = host.lower().rstrip(".")
        return any((h.endswith(d) or h == d[1:]) and p in (None, port) for d, p in self.domains)


class ProxyConfig:
    def __init__(self, http_proxy: str = "", https_proxy: str = "", no_proxy: str = ""):
        self._http = ProxyURL.parse(http_proxy, "HTTP_PROXY") if http_proxy.strip() else None
        self._https = ProxyURL.parse(https_proxy, "HTTPS_PROXY") if https_proxy.strip() else None
        self._no = _NoProxy(no_proxy)

    @classmethod
    def from_env(cls, env) -> "ProxyConfig":
        def get(name):
            return env.get(name) or env.get(name.lower()) or ""
        return cls(get("HTTP_PROXY"), get("HTTPS_PROXY"), get("NO_PROXY"))

    def proxy_for(self, scheme: str, host: str, port: int) -> ProxyURL | None:
        proxy = self._https if scheme == "https" else self._http
        if proxy is None or _is_local(host) or self._no.bypass(host, port):
            return None
        return proxy


def _is_local(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect_request(host: str, port: int, proxy: ProxyURL) -> bytes:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    auth = f"Proxy-Authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
    return (f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}"
            f"User-Agent: tsproxy\r\n\r\n").encode()


def check_connect_response(head: bytes, proxy: ProxyURL) -> None:
    """head: the proxy's response up to and including the blank line.  Raises on refusal."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise RemoteProtocolError(f"proxy {proxy.display}: not an HTTP answer to CONNECT")
    code = int(parts[1])
    if 200 <= code < 300:
        return
    reason = parts[2][:80] if len(parts) > 2 else ""
    if code == 407:
        raise RemoteProtocolError(f"proxy {proxy.display} requires authentication (407 {reason})"
                                  .rstrip())
    raise RemoteProtocolError(f"proxy {proxy.display} refused CONNECT: {code} {reason}".rstrip())
