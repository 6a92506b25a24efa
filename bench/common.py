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
