"""Load generator for the load and soak benches and tests: many concurrent downloads through a
tsproxy proxy port (raw SOCKS5, HTTP absolute-form GET and HTTP CONNECT over 127.0.0.1), each
checked byte for byte, each timed chunk by chunk so the longest stall of every connection is
measured; plus the host-side counters a run reports (UDP drops, a process's fds and RSS).

    results = asyncio.run(download_many(port, "100.64.0.2", 80, n=200, size=10**6))
    summary = summarize(results)       # ok/failed counts, errors, bytes, rate, worst stall

The servers are those of `tsproxy.testing.servers` (`GET /bytes/N` answers a deterministic
pattern whose sha256 is `pattern_sha256(N)`).  Nothing here dials anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass

from tsproxy.testing.servers import pattern_sha256

@dataclass
class Transfer:
    index: int
    kind: str
    ok: bool = False
    error: str = ""
    body_bytes: int = 0
    expected: int = 0
    t_start: float = 0.0          # monotonic: before the local TCP connect
    t_request: float = 0.0        # the proxy handshake is done and the GET is sent
    t_first: float = 0.0          # first body or header byte after the request
    t_end: float = 0.0
    max_gap: float = 0.0          # longest time between two received chunks (after the first)
    max_gap_at: float = 0.0       # monotonic: when that longest gap ended
    gaps_over_1s: int = 0

    @property
    def duration(self) -> float:
        return self.t_end - self.t_start

    @property
    def first_byte(self) -> float:
        """Request sent -> first byte of the answer (a stall before any data arrives)."""
        return (self.t_first - self.t_request) if self.t_first and self.t_request else 0.0


def _head_end(buf: bytes | bytearray) -> int:
    i = buf.find(b"\r\n\r\n")
    return -1 if i < 0 else i + 4


async def _socks5(reader, writer, host: str, port: int) -> None:
    writer.write(b"\x05\x01\x00")
    if await reader.readexactly(2) != b"\x05\x00":
        raise RuntimeError("SOCKS5 greeting refused")
    h = host.encode()
    writer.write(b"\x05\x01\x00\x03" + bytes([len(h)]) + h + struct.pack("!H", port))
    rep = await reader.readexactly(4)
    if rep[1] != 0:
        raise RuntimeError(f"SOCKS5 reply {rep[1]}")
    atyp = rep[3]
    n = {1: 4, 4: 16}.get(atyp)
    if n is None:
        n = (await reader.readexactly(1))[0]
    await reader.readexactly(n + 2)


async def _connect(reader, writer, host: str, port: int) -> None:
    auth = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    writer.write(f"CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200" not in status:
        raise RuntimeError(f"CONNECT answered {status[:80]!r}")


async def download(index: int, kind: str, proxy_port: int, host: str, port: int, size: int,
                   *, timeout: float = 600.0, idle: float = 120.0,
                   path: str | None = None, expected_sha256: str | None = None) -> Transfer:
    """One download of `GET /bytes/size` (or `path`) through the proxy; never raises."""
    t = Transfer(index, kind, expected=size)
    t.t_start = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, limit=1 << 20)
            path = path or f"/bytes/{size}"
            hosthdr = f"[{host}]" if ":" in host else host
            if kind == "socks5":
                await _socks5(reader, writer, host, port)
                req = f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\nConnection: close\r\n\r\n"
            elif kind == "connect":
                await _connect(reader, writer, host, port)
                req = f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\nConnection: close\r\n\r\n"
            else:
                req = (f"GET http://{hosthdr}:{port}{path} HTTP/1.1\r\nHost: {hosthdr}\r\n"
                       "Connection: close\r\n\r\n")
            writer.write(req.encode())
            t.t_request = time.monotonic()
            await _receive(t, reader, idle, expected_sha256 or pattern_sha256(size))
    except TimeoutError:
        t.error = t.error or f"no completion within {timeout:.0f} s"
    except Exception as e:                              # noqa: BLE001 - recorded per transfer
        t.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        t.t_end = time.monotonic()
        if writer is not None:
            writer.close()
    return t


async def _receive(t: Transfer, reader: asyncio.StreamReader, idle: float, want_sha: str) -> None:
    h = hashlib.sha256()
    head = bytearray()
    length = None
    got = 0
    last = None
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 18), idle)
        except TimeoutError:
            t.error = f"idle {idle:.0f} s after {got} body bytes"
            t.body_bytes = got
            return
        now = time.monotonic()
        if not chunk:
            break
        if last is None:
            t.t_first = now
        else:
            gap = now - last
            if gap > t.max_gap:
                t.max_gap, t.max_gap_at = gap, now
            if gap > 1.0:
                t.gaps_over_1s += 1
        last = now
        if length is None:
            head += chunk
            end = _head_end(head)
            if end < 0:
                if len(head) > 65536:
                    raise RuntimeError("response head over 64 KiB")
                continue
            lines = bytes(head[:end]).split(b"\r\n")
            if b" 200 " not in lines[0] + b" ":
                raise RuntimeError(f"status {lines[0][:80]!r}")
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if length is None:
                raise RuntimeError("no Content-Length in the response")
            chunk = bytes(head[end:])
        h.update(chunk)
        got += len(chunk)
    t.body_bytes = got
    if length is None:
        t.error = "closed before the response head"
    elif got != length or got != t.expected:
        t.error = f"{got} body bytes of {t.expected} (Content-Length {length})"
    elif h.hexdigest() != want_sha:
        t.error = "sha256 mismatch"
    else:
        t.ok = True


MIX = ("socks5", "http", "socks5", "connect")


def kind_of(i: int, mix: tuple[str, ...] = MIX) -> str:
    """By default half SOCKS5, a quarter HTTP GET through the proxy, a quarter HTTP CONNECT."""
    return mix[i % len(mix)]


async def download_many(proxy_port: int, host: str, port: int, *, n: int, size: int,
                        mix: tuple[str, ...] = MIX, timeout: float = 600.0,
                        idle: float = 120.0, path_prefix: str = "") -> list[Transfer]:
    """n downloads of `{path_prefix}/bytes/{size}` started at once."""
    return list(await asyncio.gather(*(
        download(i, kind_of(i, mix), proxy_port, host, port, size, timeout=timeout, idle=idle,
                 path=f"{path_prefix}/bytes/{size}")
        for i in range(n))))


def summarize(results: list[Transfer]) -> dict:
    """Counts, errors (grouped), aggregate rate from the first start to the last end, and the
    worst stall: the longest gap between chunks of any one connection, and which it was."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = f"{r.kind}: {r.error}"
            errors[key] = errors.get(key, 0) + 1
    t0 = min((r.t_start for r in results), default=0.0)
    t1 = max((r.t_end for r in results), default=0.0)
    wall = max(t1 - t0, 1e-9)
    total = sum(r.body_bytes for r in results)
    worst = max(results, key=lambda r: r.max_gap, default=None)
    slowest = max(results, key=lambda r: r.duration, default=None)
    durations = sorted(r.duration for r in results)
    late = max(results, key=lambda r: r.first_byte, default=None)
    firsts = sorted(r.first_byte for r in results)
    return {
        "transfers": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "errors": errors, "body_bytes": total, "seconds": wall, "rate_MBps": total / wall / 1e6,
        "max_gap_s": worst.max_gap if worst else 0.0,
        "max_gap_conn": {"index": worst.index, "kind": worst.kind} if worst else None,
        "conns_with_gap_over_1s": sum(1 for r in results if r.gaps_over_1s),
        "max_first_byte_s": max((r.first_byte for r in results), default=0.0),
        "first_byte_p50_s": firsts[len(firsts) // 2] if firsts else 0.0,
        "first_byte_p90_s": firsts[len(firsts) * 9 // 10] if firsts else 0.0,
        "max_first_byte_conn": ({"index": late.index, "kind": late.kind,
                                 "handshake_s": (late.t_request - late.t_start) if late.t_request else None}
                                if late else None),
        "slowest_conn": ({"index": slowest.index, "kind": slowest.kind, "seconds": slowest.duration,
                          "max_gap_s": slowest.max_gap} if slowest else None),
        "duration_p50_s": durations[len(durations) // 2] if durations else 0.0,
        "duration_max_s": durations[-1] if durations else 0.0,
    }


def transfer_dict(t: Transfer) -> dict:
    return asdict(t)


# ---------------------------------------------------------------------------- host counters
def udp_snmp(netns_pid: int | None = None) -> dict[str, int]:
    """The Udp: and Udp6 receive-error counters of /proc/net/snmp (+snmp6) of this namespace
    (or of the namespace of process `netns_pid`)."""
    base = f"/proc/{netns_pid}/net" if netns_pid else "/proc/net"
    out: dict[str, int] = {}
    with open(f"{base}/snmp") as f:
        lines = [ln.split() for ln in f if ln.startswith("Udp:")]
    if len(lines) >= 2:
        for k, v in zip(lines[0][1:], lines[1][1:]):
            out[f"Udp.{k}"] = int(v)
    try:
        with open(f"{base}/snmp6") as f:
            for ln in f:
                k, _, v = ln.partition(" ")
                if k.startswith("Udp6"):
                    out[k.replace("Udp6", "Udp6.")] = int(v)
    except OSError:
        pass
    return out


def snmp_delta(before: dict[str, int], after: dict[str, int],
               keys=("Udp.InErrors", "Udp.RcvbufErrors", "Udp6.InErrors", "Udp6.RcvbufErrors")) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def udp_socket_drops(port: int, netns_pid: int | None = None) -> int:
    """The 'drops' column of /proc/net/udp and udp6 for sockets bound to local `port`."""
    base = f"/proc/{netns_pid}/net" if netns_pid else "/proc/net"
    total = 0
    for name in ("udp", "udp6"):
        try:
            with open(f"{base}/{name}") as f:
                next(f)
                for ln in f:
                    cols = ln.split()
                    if int(cols[1].rsplit(":", 1)[1], 16) == port:
                        total += int(cols[-1])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return total


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss(pid: int) -> int:
    """Resident set size in bytes."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def raise_nofile(want: int = 8192) -> int:
    """Raise this process's soft fd limit (children inherit it); returns the new soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, want), hard) if hard != resource.RLIM_INFINITY else max(soft, want)
    if new != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def udp_echo_roundtrips(port: int, count: int, *, timeout: float = 5.0) -> tuple[int, int]:
    """`count` datagrams to a local UDP forward; returns (sent, echoed back byte-exact)."""
    good = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for i in range(count):
            msg = b"load %d " % i + os.urandom(64)
            s.sendto(msg, ("127.0.0.1", port))
            try:
                if s.recvfrom(2048)[0] == msg:
                    good += 1
            except (TimeoutError, OSError):
                pass
    return count, good


def main(argv=None) -> int:
    """`python -m tsproxy.testing.loadgen --port P --host H --n N --size S`: one round in its
    own process (so the client's CPU is not the bench's), printing summarize() + failures as
    JSON on stdout."""
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="python -m tsproxy.testing.loadgen")
    ap.add_argument("--port", type=int, required=True, help="tsproxy's SOCKS5+HTTP port on 127.0.0.1")
    ap.add_argument("--host", required=True)
    ap.add_argument("--target-port", type=int, default=80)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--mix", default=",".join(MIX), help="comma list cycled over the connections")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--idle", type=float, default=120.0)
    ap.add_argument("--path-prefix", default="", help="e.g. /svc for a Go node's proxied /svc/bytes/N")
    a = ap.parse_args(argv)
    raise_nofile(a.n * 2 + 256)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    results = runner(download_many(a.port, a.host, a.target_port, n=a.n, size=a.size,
                                   mix=tuple(a.mix.split(",")), timeout=a.timeout, idle=a.idle,
                                   path_prefix=a.path_prefix))
    out = summarize(results)
    out["failures"] = [transfer_dict(t) for t in results if not t.ok][:50]
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
