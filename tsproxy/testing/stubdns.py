"""A stub DNS resolver for tests: logs every query, answers REFUSED, forwards nothing.

Test daemons run with it as their only resolver (`wrap`: a private mount namespace whose
/etc/resolv.conf names the stub), so anything a daemon would have asked the host's resolver
shows up in `queries` instead of leaving the machine.  Each stub listens on its own loopback
address 127.53.X.Y port 53 (resolv.conf has no port field), chosen from the PID and a
counter so parallel runs do not collide.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import tempfile
import threading

_counter = itertools.count(1)
REFUSED = 5


def parse_question(q: bytes) -> tuple[str, int]:
    """-> (qname, qtype) of a query's first question; ValueError if it has none."""
    if len(q) < 12 or struct.unpack("!H", q[4:6])[0] < 1:
        raise ValueError("no question")
    labels, i = [], 12
    while True:
        if i >= len(q):
            raise ValueError("truncated name")
        n = q[i]
        if n == 0:
            break
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(q[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    if i + 5 > len(q):
        raise ValueError("truncated question")
    return ".".join(labels), struct.unpack("!H", q[i + 1:i + 3])[0]


def refused(q: bytes) -> bytes:
    """The reply to `q`: same id and question, QR set, RCODE REFUSED, no records."""
    try:
        parse_question(q)
        end = q.index(b"\x00", 12) + 5
        question, qd = q[12:end], 1
    except ValueError:
        question, qd = b"", 0
    flags = 0x8000 | (struct.unpack("!H", q[2:4])[0] & 0x0100) | REFUSED   # QR, keep RD
    return q[:2] + struct.pack("!HHHHH", flags, qd, 0, 0, 0) + question


class StubResolver:
    def __init__(self, host: str | None = None):
        self.queries: list[tuple[str, int, str]] = []     # (qname, qtype, "udp"/"tcp")
        self._lock = threading.Lock()
        for _ in range(64 if host is None else 1):
            cand = host or _candidate()
            try:
                self._udp, self._tcp = _bind(cand)
                break
            except OSError:
                if host is not None:
                    raise
        else:
            raise OSError("no free 127.53.x.y:53 for the stub resolver")
        self.host: str = cand
        fd, self.resolv_conf = tempfile.mkstemp(prefix="tsp-stubdns-", suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(f"nameserver {self.host}\noptions attempts:1 timeout:1\n")
        os.chmod(self.resolv_conf, 0o644)
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self._threads:
            t.start()

    def _note(self, q: bytes, proto: str) -> None:
        try:
            name, qtype = parse_question(q)
        except ValueError:
            name, qtype = "<malformed>", 0
        with self._lock:
            self.queries.append((name, qtype, proto))

    def _serve_udp(self) -> None:
        while True:
            try:
                q, addr = self._udp.recvfrom(4096)
            except OSError:
                return
            self._note(q, "udp")
            try:
                self._udp.sendto(refused(q), addr)
            except (OSError, IndexError, struct.error):
                pass

    def _serve_tcp(self) -> None:
        while True:
            try:
                c, _ = self._tcp.accept()
            except OSError:
                return
            with c:
                try:
                    c.settimeout(2)
                    n = struct.unpack("!H", _recv_exact(c, 2))[0]
                    q = _recv_exact(c, n)
                    self._note(q, "tcp")
                    r = refused(q)
                    c.sendall(struct.pack("!H", len(r)) + r)
                except (OSError, ValueError, struct.error):
                    pass

    def names(self) -> list[str]:
        with self._lock:
            return [q[0] for q in self.queries]

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` run in a private mount namespace where /etc/resolv.conf names only this stub
        (needs root; the network namespace stays the caller's, so loopback works)."""
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/resolv.conf && exec "$@"', self.resolv_conf, *cmd]

    def close(self) -> None:
        for s in (self._udp, self._tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        try:
            os.unlink(self.resolv_conf)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "StubResolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _candidate() -> str:
    n = (os.getpid() * 31 + next(_counter)) % (254 * 254)
    return f"127.53.{n // 254 + 1}.{n % 254 + 1}"


def _bind(host: str) -> tuple[socket.socket, socket.socket]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        udp.bind((host, 53))
        tcp.bind((host, 53))
        tcp.listen(16)
    except OSError:
        udp.close()
        tcp.close()
        raise
    return udp, tcp


def _recv_exact(c: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = c.recv(n - len(buf))
        if not chunk:
            raise ValueError("short read")
        buf += chunk
    return buf
