"""Shared bench helpers: repeat a measurement, report `median [min..max] unit`, compare with
the reference client (sing-box) measured in the same run, and store JSON under bench/results/.

    from bench.common import Summary, curl_rate, ratio_line, run_repeated, save_results, reference_env

MB = 10**6 bytes throughout.  Benches need root (namespaces) and are never run by pytest.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
MB = 1_000_000
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@dataclass
class Summary:
    label: str
    unit: str
    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def line(self) -> str:
        """`label: 123.4 [120.1..130.0] MB/s (n=5)`; failed runs are counted, never hidden."""
        err = f", {len(self.errors)} failed" if self.errors else ""
        if not self.values:
            return f"{self.label}: no successful run{err}"
        return (f"{self.label}: {self.median:.1f} [{min(self.values):.1f}..{max(self.values):.1f}] "
                f"{self.unit} (n={len(self.values)}{err})")

    def as_dict(self) -> dict:
        return {"label": self.label, "unit": self.unit, "median": self.median,
                "min": min(self.values) if self.values else None,
                "max": max(self.values) if self.values else None,
                "values": self.values, "errors": self.errors}


def run_repeated(label: str, unit: str, fn, runs: int = 5, warmup: int = 0) -> Summary:
    """Call fn() warmup+runs times; each call returns one number.  Exceptions are recorded
    as failed runs (with their message) so a flaky path shows up in the report."""
    s = Summary(label, unit)
    for i in range(warmup + runs):
        try:
            v = float(fn())
        except Exception as e:                      # noqa: BLE001 - reported, not swallowed
            if i >= warmup:
                s.errors.append(f"{type(e).__name__}: {e}"[:300])
            continue
        if i >= warmup:
            s.values.append(v)
    return s


def ratio(ours: Summary, ref: Summary) -> float | None:
    if ours.median is None or not ref.median:
        return None
    return ours.median / ref.median


def ratio_line(ours: Summary, ref: Summary, higher_is_better: bool = True) -> str:
    r = ratio(ours, ref)
    if r is None:
        return f"{ours.label} / {ref.label}: n/a"
    word = "of" if higher_is_better else "x the time of"
    return f"{ours.label} / {ref.label}: {r:.2f} ({r * 100:.0f}% {word} the reference)"


def curl_rate(args: list[str], ns: str | None = None, timeout: float = 300,
              expect_bytes: int | None = None, upload: bool = False) -> float:
    """One curl transfer; returns MB/s (size/time_total, so connect + proxy setup included).
    Raises RuntimeError on a non-2xx status, a curl error or a short transfer."""
    fmt = "%{http_code} %{size_upload} %{size_download} %{time_total}"
    cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(timeout), "-w", fmt, *args]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
    if p.returncode != 0:
        raise RuntimeError(f"curl rc={p.returncode}: {p.stderr.strip()[:200]}")
    code, up, down, total = p.stdout.split()
    n = int(float(up if upload else down))
    if not code.startswith("2"):
        raise RuntimeError(f"HTTP {code}")
    if expect_bytes is not None and n != expect_bytes:
        raise RuntimeError(f"transferred {n} bytes, expected {expect_bytes}")
    return n / float(total) / MB


def timed(fn) -> float:
    """Seconds fn() takes (monotonic)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _git_commit() -> str:
    p = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def save_results(name: str, summaries: list[Summary], extra: dict | None = None) -> str:
    """Write bench/results/<name>-<UTC stamp>.json and return its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS_DIR, f"{name}-{stamp}.json")
    doc = {"bench": name, "utc": stamp, "commit": _git_commit(), "python": platform.python_version(),
           "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
           "results": [s.as_dict() for s in summaries], **(extra or {})}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


@contextlib.contextmanager
def reference_env(workdir: str | None = None, singbox: bool = True):
    """The real peer (wireguard-go + our servers) and, optionally, sing-box as the reference
    client in its own namespace; yields (peer, singbox_or_None) and tears both down."""
    from tsproxy.testing.peers import find_binary
    from tsproxy.testing.wgpeer import WireGuardPeer
    if os.geteuid() != 0:
        raise SystemExit("benches need root (network namespaces for the peer)")
    for b in ("wireguard-go", "wg", "curl") + (("sing-box",) if singbox else ()):
        find_binary(b)
    peer = WireGuardPeer(workdir).start()
    ref = None
    try:
        if singbox:
            from tsproxy.testing.singbox import SingBoxClient
            ref = SingBoxClient(peer).start()
        yield peer, ref
    finally:
        if ref is not None:
            ref.stop()
        peer.stop()


# ---------------------------------------------------------------- alternating runs

def alternate(contenders: dict, runs: int, warmup: int = 0, pause: float = 0.3) -> dict[str, list]:
    """Each round calls every contender's fn once, the order flipped every round so neither
    side always gets the warmer machine.  Returns {name: [result, ...]}; a failed run is kept
    as its exception (to_summary counts it), never dropped."""
    out: dict[str, list] = {name: [] for name in contenders}
    for i in range(warmup + runs):
        order = list(contenders.items())
        if i % 2:
            order.reverse()
        for name, fn in order:
            try:
                v = fn()
            except Exception as e:                  # noqa: BLE001 - reported, not swallowed
                v = e
            if i >= warmup:
                out[name].append(v)
            time.sleep(pause)
    return out


def to_summary(label: str, unit: str, outcomes: list, pick=None) -> Summary:
    """A Summary from alternate()'s outcomes; `pick` takes one number out of a result (dict)."""
    s = Summary(label, unit)
    for o in outcomes:
        if isinstance(o, BaseException):
            s.errors.append(f"{type(o).__name__}: {o}"[:300])
            continue
        try:
            s.values.append(float(pick(o) if pick else o))
        except Exception as e:                      # noqa: BLE001
            s.errors.append(f"{type(e).__name__}: {e}"[:300])
    return s


# ---------------------------------------------------------------- transfers

def write_pattern_file(path: str, size: int) -> str:
    """`size` deterministic bytes (servers.pattern_chunks) for upload runs."""
    from tsproxy.testing.servers import pattern_chunks
    with open(path, "wb") as f:
        for c in pattern_chunks(size):
            f.write(c)
    return path


def curl_upload_args(path: str) -> list[str]:
    """curl arguments that stream `path` as a POST body (-T streams; --data-binary would read
    the whole file into memory first)."""
    return ["-T", path, "-X", "POST", "-H", "Expect:", "-H", "Content-Type: application/octet-stream"]


def parallel_rate(argv_list: list[list[str]], ns: str | None = None, timeout: float = 300,
                  expect_bytes: int | None = None) -> float:
    """Aggregate MB/s of several curl downloads started together (total bytes / wall time)."""
    fmt = "%{http_code} %{size_download}"
    procs = []
    t0 = time.perf_counter()
    for args in argv_list:
        cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(timeout), "-w", fmt, *args]
        procs.append(subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + cmd,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    total, bad = 0, []
    for p in procs:
        out, err = p.communicate(timeout=timeout + 30)
        if p.returncode != 0:
            bad.append(f"curl rc={p.returncode}: {err.strip()[:120]}")
            continue
        code, n = out.split()
        if not code.startswith("2") or (expect_bytes is not None and int(n) != expect_bytes):
            bad.append(f"HTTP {code}, {n} bytes")
        total += int(n)
    wall = time.perf_counter() - t0
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(procs)} streams failed: {bad[0]}")
    return total / wall / MB


# connections per second: N SOCKS5 CONNECTs, C at a time, each doing one small exchange
# (echo: 1 byte to a TCP echo server; http: one GET /, the client closing after the answer: a
# server closing first keeps the 4-tuple in TIME_WAIT, and a reused random port then fails);
# a connection that fails is counted (with the first error), never retried
CONN_CLIENT = r'''
import asyncio, json, socket, struct, sys, time
port, n, c, dst, dport, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
REPLY = {1: "general failure", 2: "not allowed", 3: "network unreachable", 4: "host unreachable",
         5: "connection refused", 6: "TTL expired / timeout"}
async def one(lat):
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(dst) + struct.pack("!H", dport))
        hello = await r.readexactly(2 + 4)
        if hello[1] != 0 or hello[3] != 0:
            raise RuntimeError(f"SOCKS5 reply {hello[3]} ({REPLY.get(hello[3], '?')})")
        await r.readexactly(6)
        if mode == "echo":
            w.write(b"x")
            assert await r.readexactly(1) == b"x"
        else:       # read the whole answer, then close first (TIME_WAIT stays on our side)
            w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"HTTP answer {head[:40]!r}")
            length = [int(x.split(b":")[1]) for x in head.lower().split(b"\r\n")
                      if x.startswith(b"content-length:")]
            await r.readexactly(length[0])
    finally:
        w.close()
    lat.append(time.perf_counter() - t0)
async def main():
    lat, sem, errors = [], asyncio.Semaphore(c), []
    async def guarded():
        async with sem:
            try:
                await asyncio.wait_for(one(lat), 30)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
    t0 = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(n)))
    wall = time.perf_counter() - t0
    lat.sort()
    print(json.dumps({"rate": len(lat) / wall, "failed": len(errors), "error": errors[:1],
                      "p50": lat[len(lat) // 2] * 1e3 if lat else None,
                      "p99": lat[max(int(len(lat) * 0.99) - 1, 0)] * 1e3 if lat else None}))
asyncio.run(main())
'''


def conn_rate(port: int, n: int, c: int, dst: str, dport: int = 7, ns: str | None = None,
              mode: str = "echo", timeout: float = 300, check: bool = True) -> dict:
    """{"rate": conn/s, "p50": ms, "p99": ms, "failed": count, "error": [first]} for n SOCKS5
    connections through 127.0.0.1:port; with `check`, RuntimeError when any of them failed (a
    run with failures is a failed run)."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [
        sys.executable, "-c", CONN_CLIENT, str(port), str(n), str(c), dst, str(dport), mode]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip()[-300:])
    res = json.loads(p.stdout)
    if check and res["failed"]:           # the run fails as a whole, with the count and why
        raise RuntimeError(f"{res['failed']} of {n} connections failed, first: {res['error'][0]}")
    return res


# N idle SOCKS5 connections to an echo server, each proven open (1 byte echoed), held until
# stdin closes
IDLE_CLIENT = r'''
import asyncio, socket, struct, sys
port, n, dst, dport = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
async def one(conns, sem):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(dst) + struct.pack("!H", dport))
        hello = await r.readexactly(12)
        assert hello[1] == 0 and hello[3] == 0, hello
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        conns.append(w)
async def main():
    conns, sem = [], asyncio.Semaphore(50)
    await asyncio.gather(*(one(conns, sem) for _ in range(n)))
    print(f"ready {len(conns)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in conns:
        w.close()
asyncio.run(main())
'''


@contextlib.contextmanager
def idle_connections(port: int, n: int, dst: str, dport: int = 7, ns: str | None = None,
                     timeout: float = 120):
    """Hold n idle proxied connections open for the body of the with block."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 4096), hard))
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [
        sys.executable, "-c", IDLE_CLIENT, str(port), str(n), dst, str(dport)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout) or not (line := p.stdout.readline()).startswith("ready"):
            p.kill()
            raise RuntimeError(f"idle connections not up: {p.stderr.read()[-300:]}")
        yield int(line.split()[1])
    finally:
        if p.poll() is None:
            p.stdin.close()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# ---------------------------------------------------------------- process figures (/proc)

def process_tree(pid: int) -> list[int]:
    """pid and every live descendant."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            kids.setdefault(int(rest[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its descendants, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(rest[11]) + int(rest[12])           # fields 14 and 15: utime, stime
    return total / tick


def rss_kb(pid: int) -> int:
    """VmRSS of pid and its descendants, in KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def machine_notes(extra: dict | None = None) -> dict:
    """CPU count, load average, kernel, Python, commit and date for a results file."""
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    la = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_commit() + (" (with uncommitted changes)" if dirty else ""),
            "cpus": os.cpu_count(), "load average (1/5/15 min) at start": la,
            "kernel": platform.release(), "python": platform.python_version(), **(extra or {})}
