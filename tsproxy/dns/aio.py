"""Resolve names through DNS servers reached over the tunnel (plain WireGuard mode's `DNS =`).

Queries A and AAAA in parallel over the netstack's UDP, retries once per server, caches answers
for their TTL (bounded), and shares one in-flight lookup between concurrent callers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from tsproxy.dns import message
from tsproxy.errors import HostUnreachable

log = logging.getLogger(__name__)

CACHE_MAX = 1024
TRY_TIMEOUT = 2.0


class TunnelResolver:
    def __init__(self, netstack, servers, search=(), *, rng=os.urandom):
        self.netstack = netstack            # has `async open_udp()` -> endpoint(sendto, recvfrom, close)
        self.servers = [str(s) for s in servers]
        self.search = list(search)
        self.rng = rng
        self._cache: dict[str, tuple[float, list]] = {}
        self._inflight: dict[str, asyncio.Future] = {}

    async def resolve(self, name: str) -> list:
        """Addresses for `name` (A first, then AAAA); HostUnreachable if none."""
        name = name.rstrip(".").lower()
        hit = self._cache.get(name)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        fut = self._inflight.get(name)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup(name))
            self._inflight[name] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(name, None))
        return await asyncio.shield(fut)

    async def _lookup(self, name: str) -> list:
        if not self.servers:
            raise HostUnreachable(f"cannot resolve {name}: no DNS server in the WireGuard config")
        candidates = [name] if "." in name or not self.search else [f"{name}.{s}" for s in self.search] + [name]
        for cand in candidates:
            addrs, ttl = await self._query_both(cand)
            if addrs:
                if len(self._cache) >= CACHE_MAX:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[name] = (time.monotonic() + max(5, min(ttl, 300)), addrs)
                return addrs
        raise HostUnreachable(f"cannot resolve {name}: no such host")

    async def _query_both(self, name: str):
        res = await asyncio.gather(self._query(name, message.TYPE_A), self._query(name, message.TYPE_AAAA),
                                   return_exceptions=True)
        addrs, ttl = [], 300
        for r in res:
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                continue
            addrs += r[0]
            ttl = min(ttl, r[1])
        if all(isinstance(r, BaseException) for r in res):
            raise HostUnreachable(f"cannot resolve {name}: DNS server did not answer")
        return addrs, ttl

    async def _query(self, name: str, qtype: int):
        last: Exception | None = None
        for server in self.servers:
            for _ in range(2):
                txid = int.from_bytes(self.rng(2), "big")
                ep = await self.netstack.open_udp()
                try:
                    ep.sendto(message.build_query(txid, name, qtype), (server, 53))
                    async with asyncio.timeout(TRY_TIMEOUT):
                        while True:
                            data, _addr = await ep.recvfrom()
                            try:
                                rid, rcode, _q, answers = message.parse_response(data)
                            except message.DnsFormatError:
                                continue
                            if rid != txid:
                                continue
                            if rcode not in (message.RCODE_NOERROR, message.RCODE_NXDOMAIN):
                                raise HostUnreachable(f"DNS server {server} answered rcode {rcode}")
                            addrs = message.addresses_for(answers, name)
                            ttl = min((a[2] for a in answers), default=60)
                            return addrs, ttl
                except TimeoutError as e:
                    last = e
                except HostUnreachable as e:
                    last = e
                    break
                finally:
                    ep.close()
        raise HostUnreachable(f"cannot resolve {name}: {last or 'no answer'}")
