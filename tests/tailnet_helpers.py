"""Helpers shared by the tailnet tests (and bench/bench_tailnet.py): polling, a peer's path in
a daemon's status, curl through a daemon's SOCKS5 proxy (at once, or in the background hashing
what arrives, for the fault tests), and a small page server."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import threading
import time

from tests.waiting import eventually  # noqa: F401  (re-exported: the tailnet tests import it from here)
from tsproxy.testing.servers import pattern_chunks


def peer_status(daemon, name: str) -> dict | None:
    for p in daemon.status()["peers"]:
        if p["name"] == name:
            return p
    return None


def path_of(daemon, name: str) -> str:
    """'direct IP:PORT', 'derp REGION', or '' when the peer is unknown."""
    p = peer_status(daemon, name)
    return (p or {}).get("path") or ""


def socks_curl(port: int, url: str, *extra: str, timeout: float = 20):
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *extra, "--socks5-hostname",
                           f"127.0.0.1:{port}", url], capture_output=True, text=True,
                          timeout=timeout + 5)


class BackgroundCurl:
    """curl through the daemon's SOCKS5 proxy in the background, hashing what it receives."""

    def __init__(self, port: int, url: str, max_time: float):
        self.p = subprocess.Popen(["curl", "-sS", "--max-time", str(max_time), "--socks5-hostname",
                                   f"127.0.0.1:{port}", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.h, self.n = hashlib.sha256(), 0
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        while chunk := self.p.stdout.read1(1 << 16):
            self.h.update(chunk)
            self.n += len(chunk)

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"transfer still running after {timeout}s ({self.n} bytes): a hang")
        self.t.join(10)
        return rc, self.p.stderr.read().decode()


class PageHandler(http.server.BaseHTTPRequestHandler):
    """GET / -> 'hello from tsp-b'; /bytes/N -> pattern(N); /drip/N/S -> pattern(N) over S s."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if parts[0] == "bytes":
            n, seconds = int(parts[1]), 0.0
        elif parts[0] == "drip":
            n, seconds = int(parts[1]), float(parts[2])
        else:
            body = b"hello from tsp-b\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunks = list(pattern_chunks(n, 64 * 1024))
        pause = seconds / max(len(chunks), 1)
        for c in chunks:
            self.wfile.write(c)
            if pause:
                time.sleep(pause)

    def log_message(self, *a):
        pass


def start_page_server() -> http.server.ThreadingHTTPServer:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
