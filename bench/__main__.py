"""The bench suite in one command (root: it builds network namespaces):

    .venv/bin/python -m bench [--quick] [--runs N] [--size MB] [--only CASE ...]

Sets up every peer itself, runs each case for tsproxy and its anchor alternately (sing-box for
plain WireGuard mode, the real tailscaled for tailnet mode), and writes bench/RESULTS.md, the
chart bench/results.png and the raw numbers under bench/results/.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shlex
import subprocess
import sys
import time

from bench import suite_tailnet, suite_wg
from bench.common import MB, REPO, machine_notes, save_results
from bench.report import render_markdown, write_chart

GROUPS = suite_wg.GROUPS + suite_tailnet.GROUPS


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 20 MB transfers, 2 runs, 100 connections per conn/s run")
    ap.add_argument("--runs", type=int, help="runs per client per case (default 3; --quick 2)")
    ap.add_argument("--size", type=int, metavar="MB",
                    help="single-stream transfer size in MB (default 200; --quick 20); the 8 "
                         "streams share it, loss and DERP runs use a quarter of it")
    ap.add_argument("--conns", type=int, help="connections per conn/s run (default 200; --quick 100)")
    ap.add_argument("--idle", type=int, default=1000, help="idle connections for the RSS case")
    ap.add_argument("--only", action="append", metavar="CASE", default=[],
                    help="run only this case group (repeatable): " + ", ".join(GROUPS)
                         + "; or `wg` / `tailnet` for all of one mode")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "RESULTS.md"),
                    help="the markdown report (default bench/RESULTS.md)")
    ap.add_argument("--chart", default=None, help="the PNG chart (default results.png next to --out)")
    a = ap.parse_args(argv)
    for name, quick, full in (("runs", 2, 3), ("size", 20, 200), ("conns", 100, 200)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    if a.runs < 1 or a.size < 1 or a.conns < 1 or a.idle < 1:
        ap.error("--runs, --size, --conns and --idle must be at least 1")
    a.groups = select_groups(a.only, ap.error)
    a.chart = a.chart or os.path.join(os.path.dirname(os.path.abspath(a.out)), "results.png")
    return a


def select_groups(only: list[str], error) -> set[str]:
    if not only:
        return set(GROUPS)
    out = set()
    for name in only:
        hit = {g for g in GROUPS if g == name or g.startswith(name + "-")}
        if not hit:
            error(f"unknown case {name!r}; choose from {', '.join(GROUPS)}, wg, tailnet")
        out |= hit
    return out


def _version(cmd: list[str]) -> str:
    from tsproxy.testing.peers import find_binary
    try:
        p = subprocess.run([find_binary(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=20)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except Exception as e:                                  # noqa: BLE001 - a note, not a result
        return f"unknown ({type(e).__name__})"


def egress_check() -> str:
    """What the tsproxy daemons did on the host that they must not (the tests' egress guard:
    direct dials, host-resolver lookups, queries to the stub resolver)."""
    from tests.conftest import Daemon, stub_resolver
    bad = list(Daemon.violations)
    stub = stub_resolver()
    if stub is not None and stub.queries:
        bad.append(f"the stub resolver got {len(stub.queries)} queries: {stub.queries[:5]}")
    return "none (no direct dial, no host name lookup)" if not bad else "; ".join(bad)


def main(argv=None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the bench suite needs root (network namespaces for every peer)")
    if importlib.util.find_spec("matplotlib") is None:      # fail before a long run, not after
        raise SystemExit("the chart needs matplotlib: pip install -e '.[bench]'")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    command = ".venv/bin/python -m bench " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    notes = machine_notes({
        "wireguard-go": _version(["wireguard-go", "--version"]),
        "sing-box": _version(["sing-box", "version"]),
        "tailscaled": _version(["tailscaled", "--version"]),
        "settings": f"{a.size} MB transfers, {a.runs} runs per client per case, "
                    f"{a.conns} connections per conn/s run, {a.idle} idle connections",
        "cases": ", ".join(g for g in GROUPS if g in a.groups),
    })
    t0 = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    cases = []
    wg = a.groups & set(suite_wg.GROUPS)
    if wg:
        suite_wg.run(wg, cases, size=a.size * MB, runs=a.runs, conns=a.conns, idle=a.idle, log=log)
    tn = a.groups & set(suite_tailnet.GROUPS)
    if tn:
        suite_tailnet.run(tn, cases, size=a.size * MB, runs=a.runs, conns=a.conns, log=log)
    notes["egress check"] = egress_check()
    notes["load average (1/5/15 min) at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    notes["duration"] = f"{(time.monotonic() - t0) / 60:.1f} min"
    for d in {os.path.dirname(os.path.abspath(p)) for p in (a.out, a.chart)}:
        os.makedirs(d, exist_ok=True)
    write_chart(cases, a.chart)
    rel_chart = os.path.relpath(a.chart, os.path.dirname(os.path.abspath(a.out)))
    with open(a.out, "w") as f:
        f.write(render_markdown(cases, notes, command=command, chart=rel_chart) + "\n")
    raw = save_results("suite", [s for c in cases for s in (c.ours, c.ref) if s is not None],
                       {"notes": notes})
    log(f"wrote {a.out}, {a.chart} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
