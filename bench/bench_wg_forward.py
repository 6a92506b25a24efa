#!/usr/bin/env python3
"""Single-stream download and upload MB/s through a port forward, tsproxy vs sing-box.

Both clients talk to the same real peer (wireguard-go + Linux TCP in a namespace) in the same
run: tsproxy in the root namespace with `--forward`, sing-box (userspace WireGuard + gVisor)
in its own namespace with a `direct` inbound doing the same job.  curl measures both.

    sudo .venv/bin/python bench/bench_wg_forward.py [--runs 3] [--mb 200] [--json out.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsproxy.testing.servers import pattern_chunks  # noqa: E402
from tsproxy.testing.singbox import DIRECT_PORT, SingBoxClient  # noqa: E402
from tsproxy.testing.wgpeer import PEER_IP4, WireGuardPeer  # noqa: E402

MB = 1_000_000


def curl(ns, args):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["curl", "-sS", "--max-time", "300", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return out


def download(ns, port, size):
    out = curl(ns, ["-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}",
                    f"http://127.0.0.1:{port}/bytes/{size}"])
    code, n, speed = out.split()
    assert code == "200" and int(n) == size, out
    return float(speed) / MB


def upload(ns, port, path, size):
    out = curl(ns, ["-o", "/dev/null", "-H", "Expect:", "--data-binary", f"@{path}",
                    "-w", "%{http_code} %{size_upload} %{speed_upload}", f"http://127.0.0.1:{port}/upload"])
    code, n, speed = out.split()
    assert code == "200" and int(n) == size, out
    return float(speed) / MB


def fmt(xs):
    return f"{statistics.median(xs):7.1f} [{min(xs):.1f}..{max(xs):.1f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=200, help="download size (upload is half)")
    ap.add_argument("--json", help="write the raw results here")
    a = ap.parse_args()
    size, up_size = a.mb * MB, a.mb * MB // 2
    work = tempfile.mkdtemp(prefix="tsp-bench-")
    upfile = os.path.join(work, "up.bin")
    with open(upfile, "wb") as f:
        for c in pattern_chunks(up_size):
            f.write(c)
    results = {"tsproxy": {"down": [], "up": []}, "sing-box": {"down": [], "up": []}}
    with WireGuardPeer(os.path.join(work, "peer")) as peer:
        sb = SingBoxClient(peer).start()
        conf = peer.write_client_conf()
        from tests.conftest import Daemon, free_port
        port = free_port()
        d = Daemon(os.path.join(work, "state"), ["--wg-config", conf, "--listen", "off",
                                                 "--forward", f"{port}:{PEER_IP4}:80"]).start()
        try:
            for i in range(a.runs):
                # alternate who goes first so neither always gets the warmer machine
                order = [("tsproxy", None, port), ("sing-box", sb.ns.name, DIRECT_PORT)]
                if i % 2:
                    order.reverse()
                for name, ns, p in order:
                    results[name]["down"].append(download(ns, p, size))
                    results[name]["up"].append(upload(ns, p, upfile, up_size))
                    time.sleep(0.5)
        finally:
            d.stop()
            sb.stop()
    print(f"single stream through a port forward, MB/s (10^6 B/s), median [min..max] of {a.runs} runs")
    print(f"{'client':<10} {'download ' + str(a.mb) + ' MB':>24} {'upload ' + str(a.mb // 2) + ' MB':>24}")
    for name in ("tsproxy", "sing-box"):
        print(f"{name:<10} {fmt(results[name]['down']):>24} {fmt(results[name]['up']):>24}")
    rd = statistics.median(results["tsproxy"]["down"]) / statistics.median(results["sing-box"]["down"])
    ru = statistics.median(results["tsproxy"]["up"]) / statistics.median(results["sing-box"]["up"])
    print(f"ratio tsproxy/sing-box: download {rd:.2f}, upload {ru:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "ratio": {"down": rd, "up": ru}, "time": time.time()}, f, indent=1)


if __name__ == "__main__":
    main()
