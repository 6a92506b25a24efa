"""AllowedIPs: longest-prefix match from an address to a peer, IPv4 and IPv6.

One dict per (family, prefix length) keyed by the masked address as an int; a lookup walks
the prefix lengths in use from longest to shortest, so it costs a handful of dict probes
however many routes there are.
"""

from __future__ import annotations

import ipaddress


class AllowedIPs:
    CACHE_MAX = 4096

    def __init__(self):
        self._tables = {4: {}, 6: {}}          # family -> {prefixlen: {masked int: value}}
        self._lengths = {4: [], 6: []}         # prefix lengths present, longest first
        self._cache: dict = {}                 # packed address -> value (or None): the hot path

    def insert(self, network, value) -> None:
        net = ipaddress.ip_network(network, strict=False)
        fam, bits = net.version, net.max_prefixlen
        table = self._tables[fam].setdefault(net.prefixlen, {})
        table[int(net.network_address) >> (bits - net.prefixlen) if net.prefixlen else 0] = value
        self._lengths[fam] = sorted(self._tables[fam], reverse=True)
        self._cache.clear()

    def remove_value(self, value) -> None:
        for fam, by_len in self._tables.items():
            for plen in list(by_len):
                t = by_len[plen]
                for k in [k for k, v in t.items() if v is value]:
                    del t[k]
                if not t:
                    del by_len[plen]
            self._lengths[fam] = sorted(by_len, reverse=True)
        self._cache.clear()

    def lookup_int(self, family: int, addr: int):
        bits = 32 if family == 4 else 128
        tables = self._tables[family]
        for plen in self._lengths[family]:
            v = tables[plen].get(addr >> (bits - plen) if plen else 0)
            if v is not None:
                return v
        return None

    def lookup_packed(self, packed: bytes):
        """Lookup by a 4- or 16-byte packed address (straight from an IP header); remembered
        per address (a bounded cache, emptied whenever the table changes) since every packet
        of a flow asks the same question."""
        cache = self._cache
        try:
            return cache[packed]
        except KeyError:
            pass
        v = self.lookup_int(4 if len(packed) == 4 else 6, int.from_bytes(packed, "big"))
        if len(cache) >= self.CACHE_MAX:
            cache.clear()
        cache[bytes(packed)] = v
        return v

    def lookup(self, address):
        ip = ipaddress.ip_address(address)
        return self.lookup_int(ip.version, int(ip))

    def entries(self, value) -> list:
        out = []
        for fam, by_len in self._tables.items():
            bits = 32 if fam == 4 else 128
            cls = ipaddress.IPv4Network if fam == 4 else ipaddress.IPv6Network
            for plen, t in by_len.items():
                for k, v in t.items():
                    if v is value:
                        out.append(cls((k << (bits - plen) if plen else 0, plen)))
        return out
