"""Forward and reverse specs as users type them.

    forward:  [udp:][BIND:]LPORT:HOST:PORT     e.g. 16579:peer-a:22, udp:5353:100.64.0.2:53,
                                               127.0.0.1:8080:[fd7a:115c:a1e0::2]:80
    reverse:  TPORT:LOCALHOST:LPORT            e.g. 8022:127.0.0.1:22
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tsproxy.errors import ConfigError


@dataclass(frozen=True)
class ForwardSpec:
    proto: str              # "tcp" | "udp"
    listen_host: str
    listen_port: int
    host: str
    port: int
    text: str

    @property
    def key(self) -> str:
        return f"{self.proto}:{self.listen_port}"


@dataclass(frozen=True)
class ReverseSpec:
    tunnel_port: int
    local_host: str
    local_port: int
    text: str
    proto: str = "tcp"


def _split(text: str) -> list[str]:
    """Split on ':' outside [brackets]; brackets are removed from their part."""
    parts, cur, depth = [], "", 0
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested brackets")
            continue
        if ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced brackets")
            continue
        if ch == ":" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError("unbalanced brackets")
    parts.append(cur)
    return parts


def _port(text: str, what: str, spec: str, allow_zero=False) -> int:
    if not (text.isascii() and text.isdigit()) or not (0 if allow_zero else 1) <= int(text) <= 65535:
        raise ConfigError(f"{what} {text!r} in {spec!r} is not a port number 1..65535")
    return int(text)


def _host(text: str, spec: str) -> str:
    if not text:
        raise ConfigError(f"missing host in {spec!r}")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or not all(l and len(l) <= 63 and l[0] != "-" and l[-1] != "-"
                                      and all(c.isalnum() or c in "-_" for c in l) for l in labels):
        raise ConfigError(f"invalid host {text!r} in {spec!r}")
    return text.rstrip(".").lower()


def parse_forward(text: str) -> ForwardSpec:
    spec = text.strip()
    body, proto = spec, "tcp"
    low = spec.lower()
    if low.startswith("udp:") or low.startswith("tcp:"):
        proto, body = low[:3], spec[4:]
    try:
        parts = _split(body)
    except ValueError as e:
        raise ConfigError(f"forward {spec!r}: {e}") from None
    if len(parts) == 3:
        bind, (lport, host, port) = "127.0.0.1", parts
    elif len(parts) == 4:
        bind, lport, host, port = parts
        try:
            bind = str(ipaddress.ip_address(bind)) if bind != "localhost" else "127.0.0.1"
        except ValueError:
            raise ConfigError(f"forward {spec!r}: bind address {bind!r} must be an IP address") from None
    else:
        raise ConfigError(f"forward {spec!r} must look like [udp:]LPORT:HOST:PORT")
    return ForwardSpec(proto, bind, _port(lport, "local port", spec, allow_zero=True),
                       _host(host, spec), _port(port, "port", spec), spec)


def parse_reverse(text: str) -> ReverseSpec:
    spec = text.strip()
    proto, body = "tcp", spec
    if spec.lower().startswith(("udp:", "tcp:")):
        proto, body = spec[:3].lower(), spec[4:]
    try:
        parts = _split(body)
    except ValueError as e:
        raise ConfigError(f"reverse {spec!r}: {e}") from None
    if len(parts) != 3:
        raise ConfigError(f"reverse {spec!r} must look like [udp:]TPORT:LOCALHOST:LPORT")
    tport, host, lport = parts
    return ReverseSpec(_port(tport, "tunnel port", spec), _host(host, spec),
                       _port(lport, "local port", spec), spec, proto)


def fmt_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
