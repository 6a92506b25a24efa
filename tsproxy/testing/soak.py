"""Mixed traffic for soak runs (bench/bench_soak.py, tests/integration/test_soak_short.py):
for `seconds`, at the same time,

    bulk    `bulk` workers, each downloading `bulk_size` bytes again and again (SOCKS5)
    short   `short` workers opening many short connections (SOCKS5 by name, so the daemon
            resolves the name through the tunnel's DNS server, and HTTP GET), 1 kB each
    udp     one worker sending datagrams through a UDP forward to the peer's echo server and
            DNS queries through a UDP forward to its DNS server, each answer checked

while `sample()` (a blocking callable: RSS, fds, handshakes...) is polled every `every` seconds
in a thread.  Every transfer is checked byte for byte (tsproxy.testing.loadgen); the report
carries failures, the longest gap between chunks of any transfer, and the samples.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

from tsproxy.testing import loadgen

SLOW = 0.3        # gaps, connects, first bytes, UDP answers over this go into rep["events"]


def runqueue_wait() -> float:
    """Seconds this thread has waited for a CPU while runnable (/proc/self/schedstat; 0 where
    the kernel has no schedstats): tells a starved process from a busy one."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _Udp(asyncio.DatagramProtocol):
    """Answers matched to their question by the first `key_len` bytes (echo: a sequence
    number; DNS: the message id)."""

    def __init__(self, key_len: int):
        self.key_len = key_len
        self.waiting: dict[bytes, asyncio.Future] = {}

    def datagram_received(self, data, addr):
        fut = self.waiting.pop(data[:self.key_len], None)
        if fut is not None and not fut.done():
            fut.set_result(data)


def dns_query(qid: int, name: str) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


async def _udp_worker(stop: float, echo_port: int | None, dns_port: int | None, dns_name: str,
                      rep: dict) -> None:
    loop = asyncio.get_running_loop()
    socks = {}
    for kind, port in (("echo", echo_port), ("dns", dns_port)):
        if port:
            key_len = 8 if kind == "echo" else 2
            tr, proto = await loop.create_datagram_endpoint(lambda k=key_len: _Udp(k),
                                                            remote_addr=("127.0.0.1", port),
                                                            family=socket.AF_INET)
            socks[kind] = (tr, proto)
    i = 0
    try:
        while time.monotonic() < stop and socks:
            for kind, (tr, proto) in socks.items():
                i += 1
                if kind == "echo":
                    msg = struct.pack("!Q", i) + os.urandom(200)
                    key = msg[:8]
                else:
                    qid = i & 0xFFFF
                    msg = dns_query(qid, dns_name)
                    key = msg[:2]
                fut = loop.create_future()
                proto.waiting[key] = fut
                t0 = time.monotonic()
                tr.sendto(msg)
                rep[f"udp_{kind}_sent"] += 1
                try:
                    data = await asyncio.wait_for(fut, 2.0)
                except TimeoutError:
                    proto.waiting.pop(key, None)
                    rep[f"udp_{kind}_lost"] += 1
                    rep["events"].append({"ev": f"udp_{kind}_lost", "t": round(t0, 3)})
                    continue
                ok = data == msg if kind == "echo" else (data[:2] == key and data[2] & 0x80)
                rep[f"udp_{kind}_ok" if ok else f"udp_{kind}_bad"] += 1
                rtt = time.monotonic() - t0
                rep["udp_max_rtt_s"] = max(rep["udp_max_rtt_s"], rtt)
                if rtt > SLOW:
                    rep["events"].append({"ev": f"udp_{kind}_slow", "t": round(t0, 3), "s": round(rtt, 3)})
            await asyncio.sleep(0.05)
    finally:
        for tr, _ in socks.values():
            tr.close()


async def run(*, proxy_port: int, host: str, seconds: float, bulk: int = 4,
              bulk_size: int = 20_000_000, short: int = 6, short_host: str | None = None,
              echo_port: int | None = None, dns_port: int | None = None,
              dns_name: str = "peer.tunnel.test", sample=None, every: float = 5.0) -> dict:
    rep: dict = {"bulk_ok": 0, "short_ok": 0, "failures": [], "max_gap_s": 0.0,
                 "max_gap_at_s": None, "max_first_byte_s": 0.0, "bulk_bytes": 0,
                 "max_connect_s": 0.0,
                 "udp_max_rtt_s": 0.0, "samples": [], "events": [], "t0_monotonic": time.monotonic()}
    for kind in ("echo", "dns"):
        for what in ("sent", "ok", "bad", "lost"):
            rep[f"udp_{kind}_{what}"] = 0
    t0 = time.monotonic()
    cpu0 = time.process_time()
    stop = t0 + seconds

    def note(t: loadgen.Transfer, kind: str) -> None:
        if t.ok:
            rep[f"{kind}_ok"] += 1
        else:
            rep["failures"].append({"kind": kind, "via": t.kind, "at_s": round(t.t_end - t0, 1),
                                    "error": t.error})
        if t.max_gap > rep["max_gap_s"]:
            rep["max_gap_s"], rep["max_gap_at_s"] = t.max_gap, round(t.t_end - t0, 1)
        rep["max_first_byte_s"] = max(rep["max_first_byte_s"], t.first_byte)
        connect = (t.t_request - t.t_start) if t.t_request else 0.0
        rep["max_connect_s"] = max(rep["max_connect_s"], connect)
        if connect > SLOW:
            rep["events"].append({"ev": "connect", "t": round(t.t_request, 3), "s": round(connect, 3),
                                  "kind": kind, "via": t.kind})
        if t.max_gap > SLOW:
            rep["events"].append({"ev": "gap", "t": round(t.max_gap_at, 3), "s": round(t.max_gap, 3),
                                  "kind": kind, "via": t.kind, "bytes": t.body_bytes})
        if t.first_byte > SLOW:
            rep["events"].append({"ev": "first_byte", "t": round(t.t_first, 3),
                                  "s": round(t.first_byte, 3), "kind": kind, "via": t.kind})

    async def bulk_worker(w: int) -> None:
        n = 0
        while time.monotonic() < stop:
            t = await loadgen.download(n, "socks5" if w % 2 == 0 else "http", proxy_port, host, 80,
                                       bulk_size, timeout=300, idle=60)
            rep["bulk_bytes"] += t.body_bytes
            note(t, "bulk")
            n += 1

    async def short_worker(w: int) -> None:
        n = 0
        while time.monotonic() < stop:
            via = ("socks5", "http", "connect")[n % 3]
            t = await loadgen.download(n, via, proxy_port, short_host or host, 80, 1000,
                                       timeout=60, idle=30)
            note(t, "short")
            n += 1

    async def sampler() -> None:
        loop = asyncio.get_running_loop()
        while True:
            s = await loop.run_in_executor(None, sample)
            s["t"] = round(time.monotonic() - t0, 1)
            rep["samples"].append(s)
            if time.monotonic() >= stop:
                return
            await asyncio.sleep(min(every, max(stop - time.monotonic(), 0.1)))

    async def lag() -> None:
        # the client's own loop: a stall here would show up as a gap in every transfer
        while time.monotonic() < stop:
            t1, w1 = time.monotonic(), runqueue_wait()
            await asyncio.sleep(0.02)
            late = time.monotonic() - t1 - 0.02
            rep["client_max_lag_s"] = max(rep.get("client_max_lag_s", 0.0), late)
            if late > 0.1:
                rep["events"].append({"ev": "client_lag", "t": round(t1, 3), "s": round(late, 3),
                                      "runq_s": round(runqueue_wait() - w1, 3)})

    tasks = [asyncio.create_task(bulk_worker(w)) for w in range(bulk)]
    tasks.append(asyncio.create_task(lag()))
    tasks += [asyncio.create_task(short_worker(w)) for w in range(short)]
    if echo_port or dns_port:
        tasks.append(asyncio.create_task(_udp_worker(stop, echo_port, dns_port, dns_name, rep)))
    if sample is not None:
        tasks.append(asyncio.create_task(sampler()))
    await asyncio.gather(*tasks)
    rep["seconds"] = time.monotonic() - t0
    rep["client_cpu_s"] = time.process_time() - cpu0
    rep["failed"] = len(rep["failures"])
    return rep
