"""Servers the test peers run behind their tunnel (stdlib + asyncio only).

    python -m tsproxy.testing.servers --bind 100.64.0.2 --bind fd7a:115c:a1e0::2 [--name peer]

HTTP :80     GET /                 -> "hello from <name>\\n"
             GET /bytes/N          -> N bytes of `pattern(N)` (deterministic, see below)
             GET /drip/N/SECONDS   -> N bytes of pattern(N) spread evenly over SECONDS
             POST /upload          -> "<sha256 hex> <length>\\n" of the request body
TCP  :7 echo, :9 discard;  UDP :7 echo;  DNS :53 (A/AAAA for names given with --dns NAME=IP)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import struct
import sys

CHUNK = 256 * 1024


def pattern_chunks(n: int, chunk: int = CHUNK):
    """The bytes /bytes/N serves, as chunks: seeded by N, so a client can predict them."""
    rng = random.Random(n)
    left = n
    while left > 0:
        k = min(chunk, left)
        yield rng.randbytes(k)
        left -= k


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for c in pattern_chunks(n):
        h.update(c)
    return h.hexdigest()


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            method, path, _ = line.decode("latin-1").split(" ", 2)
            headers = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            if method == "POST" and path == "/upload":
                h = hashlib.sha256()
                n = 0
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readline()).split(b";")[0], 16)
                        if size == 0:
                            await reader.readline()
                            break
                        data = await reader.readexactly(size)
                        h.update(data)
                        n += size
                        await reader.readline()
                else:
                    left = int(headers.get("content-length", "0"))
                    while left:
                        data = await reader.read(min(left, CHUNK))
                        if not data:
                            return
                        h.update(data)
                        n += len(data)
                        left -= len(data)
                body = f"{h.hexdigest()} {n}\n".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
                continue
            if method not in ("GET", "HEAD"):
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                continue
            parts = path.split("?")[0].strip("/").split("/")
            if parts == [""]:
                body = f"hello from {name}\n".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(body))
                if method == "GET":
                    writer.write(body)
            elif parts[0] in ("bytes", "drip") and len(parts) >= 2 and parts[1].isdigit():
                n = int(parts[1])
                seconds = float(parts[2]) if parts[0] == "drip" and len(parts) > 2 else 0.0
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % n)
                if method == "GET":
                    chunk = CHUNK if not seconds else max(1024, int(n / max(seconds * 20, 1)))
                    loop = asyncio.get_running_loop()
                    t0 = loop.time()
                    sent = 0
                    for c in pattern_chunks(n, chunk):
                        writer.write(c)
                        await writer.drain()
                        sent += len(c)
                        if seconds:
                            wait = t0 + seconds * sent / n - loop.time()
                            if wait > 0:
                                await asyncio.sleep(wait)
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, ValueError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def _echo(reader, writer) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _discard(reader, writer) -> None:
    try:
        while await reader.read(CHUNK):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        self.t.sendto(data, addr)


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, records: dict):
        self.records = records

    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        try:
            reply = dns_answer(data, self.records)
        except (ValueError, IndexError, struct.error):
            return
        self.t.sendto(reply, addr)


def dns_answer(query: bytes, records: dict) -> bytes:
    import ipaddress
    txid, flags, qd = struct.unpack_from("!HHH", query)
    off, labels = 12, []
    while query[off]:
        n = query[off]
        labels.append(query[off + 1:off + 1 + n].decode())
        off += 1 + n
    qtype, qclass = struct.unpack_from("!HH", query, off + 1)
    question = query[12:off + 5]
    name = ".".join(labels).lower()
    answers = []
    for ip in records.get(name, []):
        a = ipaddress.ip_address(ip)
        if (a.version == 4 and qtype == 1) or (a.version == 6 and qtype == 28):
            answers.append(b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 60, len(a.packed)) + a.packed)
    rcode = 0 if name in records else 3
    hdr = struct.pack("!HHHHHH", txid, 0x8180 | rcode, 1, len(answers), 0, 0)
    return hdr + question + b"".join(answers)


DEFAULT_PORTS = {"http": 80, "echo": 7, "discard": 9, "udp_echo": 7, "dns": 53}


async def start_servers(binds: list[str], name: str, records: dict,
                        ports: dict | None = None) -> tuple[list, dict[str, int]]:
    """Start every server on every bind address; returns (handles, {service: port}).

    A port of 0 picks a free one (the same for all binds is not guaranteed then; tests use
    one bind).  Handles are asyncio Servers and DatagramTransports; close() them to stop."""
    ports = {**DEFAULT_PORTS, **(ports or {})}
    loop = asyncio.get_running_loop()
    handles, actual = [], {}

    def note(key, sock_port):
        actual.setdefault(key, sock_port)

    for host in binds:
        for key, cb, limit in (("http", lambda r, w: _http(r, w, name), 1 << 20),
                               ("echo", _echo, 1 << 16), ("discard", _discard, 1 << 16)):
            srv = await asyncio.start_server(cb, host, ports[key], limit=limit, backlog=4096)
            handles.append(srv)
            note(key, srv.sockets[0].getsockname()[1])
        for key, factory in (("udp_echo", _UdpEcho), ("dns", lambda: _Dns(records))):
            tr, _ = await loop.create_datagram_endpoint(factory, local_addr=(host, ports[key]))
            handles.append(tr)
            note(key, tr.get_extra_info("sockname")[1])
    return handles, actual


async def serve(binds: list[str], name: str, records: dict) -> None:
    await start_servers(binds, name, records)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tsproxy.testing.servers")
    p.add_argument("--bind", action="append", required=True)
    p.add_argument("--name", default="tsp-peer")
    p.add_argument("--dns", action="append", default=[], metavar="NAME=IP")
    a = p.parse_args(argv)
    records: dict = {}
    for item in a.dns:
        k, _, v = item.partition("=")
        records.setdefault(k.lower(), []).append(v)
    try:
        asyncio.run(serve(a.bind, a.name, records))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
