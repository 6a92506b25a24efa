"""wg-quick configuration files (plain WireGuard mode).

Accepted syntax is wg-quick's: `[Interface]` and `[Peer]` sections, `Key = value` lines, `#`
comments, keys and section names matched case-insensitively (as `wg` does).  Keys only wg-quick
itself uses (PostUp, Table, SaveConfig, ...) are ignored with a warning, because the file may be
shared with a kernel setup.  Everything else unknown or malformed is a ConfigError naming the
file, the line and the key, and never the value (it may be a private key).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from tsproxy.errors import ConfigError
from tsproxy.keys import NodePrivate, NodePublic

log = logging.getLogger(__name__)

# Keys that belong to wg-quick's shell wrapper or the kernel, not to the tunnel itself.
WG_QUICK_ONLY = {"preup", "postup", "predown", "postdown", "table", "saveconfig", "fwmark"}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass
class PeerConfig:
    public_key: NodePublic
    line: int
    preshared_key: bytes | None = None
    endpoint: tuple[str, int] | None = None   # (host or IP literal, port); resolved by the daemon
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    persistent_keepalive: int = 0


@dataclass
class InterfaceConfig:
    private_key: NodePrivate
    addresses: list[IPInterface]
    mtu: int = 1420
    listen_port: int | None = None
    dns_servers: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)


@dataclass
class WgConfig:
    path: str
    interface: InterfaceConfig
    peers: list[PeerConfig]
    warnings: list[str] = field(default_factory=list)


def load(path: str) -> WgConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read file ({e.__class__.__name__})", path=path) from None
    return parse(text, path)


def parse(text: str, path: str = "<config>") -> WgConfig:
    return _Parser(path).parse(text)


class _Parser:
    def __init__(self, path: str):
        self.path = path
        self.warnings: list[str] = []

    def err(self, line: int, msg: str, key: str | None = None) -> ConfigError:
        return ConfigError(msg, path=self.path, line=line, key=key)

    def parse(self, text: str) -> WgConfig:
        sections: list[tuple[str, int, list[tuple[int, str, str, str]]]] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("["):
                if not line.endswith("]"):
                    raise self.err(lineno, f"malformed section header {line!r}")
                name = line[1:-1].strip().lower()
                if name not in ("interface", "peer"):
                    raise self.err(lineno, f"unknown section [{line[1:-1].strip()}]"
                                   " (expected [Interface] or [Peer])")
                sections.append((name, lineno, []))
                continue
            if "=" not in line:
                raise self.err(lineno, "expected 'Key = value'")
            key, value = line.split("=", 1)
            key = key.strip()
            if not sections:
                raise self.err(lineno, "key outside of a section", key)
            sections[-1][2].append((lineno, key, key.lower(), value.strip()))

        interfaces = [s for s in sections if s[0] == "interface"]
        if not interfaces:
            raise ConfigError("no [Interface] section", path=self.path)
        if len(interfaces) > 1:
            raise self.err(interfaces[1][1], "more than one [Interface] section")
        iface = self._interface(interfaces[0])
        peers = [self._peer(s) for s in sections if s[0] == "peer"]
        if not peers:
            raise ConfigError("no [Peer] section", path=self.path)
        seen: dict[NodePublic, int] = {}
        for p in peers:
            if p.public_key in seen:
                raise self.err(p.line, f"duplicate peer (same PublicKey as the peer on line {seen[p.public_key]})")
            seen[p.public_key] = p.line
        return WgConfig(self.path, iface, peers, self.warnings)

    def _ignore_or_fail(self, lineno: int, key: str, lkey: str, section: str):
        if lkey in WG_QUICK_ONLY:
            msg = f"{self.path}:{lineno}: {key} is a wg-quick setting with no meaning here; ignored"
            self.warnings.append(msg)
            log.warning("%s", msg)
            return
        raise self.err(lineno, f"unknown key in [{section}]", key)

    def _interface(self, section) -> InterfaceConfig:
        _, header_line, entries = section
        private = None
        addresses: list[IPInterface] = []
        mtu = 1420
        listen_port = None
        dns_servers = []
        dns_search = []
        seen = set()
        for lineno, key, lkey, value in entries:
            if lkey in seen and lkey not in ("address", "dns"):
                raise self.err(lineno, "given twice", key)
            seen.add(lkey)
            if lkey == "privatekey":
                try:
                    private = NodePrivate.from_base64(value)
                except ValueError as e:
                    raise self.err(lineno, f"invalid private key ({e})", key) from None
            elif lkey == "address":
                for item in _split_list(value):
                    try:
                        addresses.append(ipaddress.ip_interface(item))
                    except ValueError:
                        raise self.err(lineno, f"invalid address {item!r}", key) from None
            elif lkey == "mtu":
                mtu = self._int(lineno, key, value, 576, 65535)
                if mtu < 1280 and any(a.version == 6 for a in addresses):
                    raise self.err(lineno, "IPv6 needs an MTU of at least 1280", key)
            elif lkey == "listenport":
                listen_port = self._int(lineno, key, value, 0, 65535)
            elif lkey == "dns":
                for item in _split_list(value):
                    try:
                        dns_servers.append(ipaddress.ip_address(item))
                    except ValueError:
                        if not _valid_domain(item):
                            raise self.err(lineno, f"invalid DNS server or search domain {item!r}", key) from None
                        dns_search.append(item.rstrip(".").lower())
            else:
                self._ignore_or_fail(lineno, key, lkey, "Interface")
        if private is None:
            raise self.err(header_line, "[Interface] has no PrivateKey")
        if not addresses:
            raise self.err(header_line, "[Interface] has no Address")
        return InterfaceConfig(private, addresses, mtu, listen_port, dns_servers, dns_search)

    def _peer(self, section) -> PeerConfig:
        _, header_line, entries = section
        public = None
        psk = None
        endpoint = None
        allowed: list[IPNetwork] = []
        keepalive = 0
        seen = set()
        for lineno, key, lkey, value in entries:
            if lkey in seen and lkey != "allowedips":
                raise self.err(lineno, "given twice", key)
            seen.add(lkey)
            if lkey == "publickey":
                try:
                    public = NodePublic.from_base64(value)
                except ValueError as e:
                    raise self.err(lineno, f"invalid public key ({e})", key) from None
            elif lkey == "presharedkey":
                try:
                    psk = NodePublic.from_base64(value).raw   # same 32-byte base64 shape
                except ValueError as e:
                    raise self.err(lineno, f"invalid preshared key ({e})", key) from None
            elif lkey == "endpoint":
                endpoint = self._endpoint(lineno, key, value)
            elif lkey == "allowedips":
                for item in _split_list(value):
                    try:
                        allowed.append(ipaddress.ip_network(item, strict=False))
                    except ValueError:
                        raise self.err(lineno, f"invalid network {item!r}", key) from None
            elif lkey == "persistentkeepalive":
                keepalive = 0 if value.lower() == "off" else self._int(lineno, key, value, 0, 65535)
            else:
                self._ignore_or_fail(lineno, key, lkey, "Peer")
        if public is None:
            raise self.err(header_line, "[Peer] has no PublicKey")
        return PeerConfig(public, header_line, psk, endpoint, allowed, keepalive)

    def _int(self, lineno, key, value, lo, hi) -> int:
        try:
            n = int(value, 10)
        except ValueError:
            raise self.err(lineno, f"expected a number, got {value!r}", key) from None
        if not lo <= n <= hi:
            raise self.err(lineno, f"{n} is out of range {lo}..{hi}", key)
        return n

    def _endpoint(self, lineno, key, value) -> tuple[str, int]:
        if value.startswith("["):
            host, sep, rest = value[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise self.err(lineno, f"malformed IPv6 endpoint {value!r} (expected [addr]:port)", key)
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                raise self.err(lineno, f"invalid IPv6 address in endpoint {value!r}", key) from None
        else:
            host, sep, port_text = value.rpartition(":")
            if not sep or not host:
                raise self.err(lineno, f"endpoint {value!r} needs host:port", key)
            if ":" in host:
                raise self.err(lineno, f"IPv6 endpoint {value!r} must be written [addr]:port", key)
            if not _valid_host(host):
                raise self.err(lineno, f"invalid endpoint host {host!r}", key)
        port = self._int(lineno, key, port_text, 1, 65535)
        return host, port


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _valid_domain(name: str) -> bool:
    name = name.rstrip(".")
    if not name or len(name) > 253:
        return False
    for label in name.split("."):
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isalnum() or c == "-" for c in label):
            return False
    return True


def _valid_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        return _valid_domain(host)
