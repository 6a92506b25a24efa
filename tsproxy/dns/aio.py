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


class DohResolver:
    """A and AAAA for a name through a peer API's DNS-over-HTTP endpoint (an exit node's),
    reached over the netstack; `url()` gives the current endpoint ("" for none).  Answers
    are cached for their TTL (bounded) per endpoint."""

    def __init__(self, netstack, url, *, rng=os.urandom, timeout: float = 5.0):
        self.netstack = netstack
        self.url = url
        self.rng = rng
        self.timeout = timeout
        self._cache: dict[tuple, tuple[float, list]] = {}
        self.counters = {"doh_queries": 0, "doh_failed": 0}

    async def resolve(self, name: str) -> list:
        from tsproxy.dns import doh
        name = name.rstrip(".").lower()
        url = self.url()
        if not url:
            raise HostUnreachable("no DNS-over-HTTPS endpoint")
        hit = self._cache.get((url, name))
        if hit and hit[0] > time.monotonic():
            return hit[1]
        host, port, path = doh.split_url(url)
        res = await asyncio.gather(*(self._query(host, port, path, name, t)
                                     for t in (message.TYPE_A, message.TYPE_AAAA)),
                                   return_exceptions=True)
        addrs, ttl, errors = [], 300, []
        for r in res:
            if isinstance(r, BaseException):
                if not isinstance(r, Exception):
                    raise r
                errors.append(r)
                continue
            addrs += r[0]
            ttl = min(ttl, r[1])
        if len(errors) == len(res):
            self.counters["doh_failed"] += 1
            raise HostUnreachable(f"{url}: {errors[0]}")
        if addrs:
            if len(self._cache) >= CACHE_MAX:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(url, name)] = (time.monotonic() + max(5, min(ttl, 300)), addrs)
        return addrs

    async def _query(self, host: str, port: int, path: str, name: str, qtype: int):
        from tsproxy.dns import doh
        from tsproxy.errors import DialError, RemoteProtocolError
        txid = int.from_bytes(self.rng(2), "big")
        self.counters["doh_queries"] += 1
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self.netstack.open_connection(host, port, timeout=self.timeout)
                try:
                    writer.write(doh.build_request(host, port, path,
                                                   message.build_query(txid, name, qtype)))
                    raw = b""
                    while len(raw) <= doh.MAX_RESPONSE:
                        chunk = await reader.read(65536)
                        if not chunk:
                            break
                        raw += chunk
                finally:
                    writer.close()
        except TimeoutError:
            raise HostUnreachable(f"no answer within {self.timeout:g} s") from None
        except (DialError, ConnectionError) as e:
            raise HostUnreachable(str(e) or type(e).__name__) from None
        try:
            body = doh.parse_response(raw)
            rid, rcode, _q, answers = message.parse_response(body)
        except RemoteProtocolError as e:
            raise HostUnreachable(str(e)) from None
        if rid != txid:
            raise HostUnreachable("answer for another query")
        if rcode not in (message.RCODE_NOERROR, message.RCODE_NXDOMAIN):
            raise HostUnreachable(f"DNS rcode {rcode}")
        return message.addresses_for(answers, name), min((a[2] for a in answers), default=60)
