"""bench/report.py and the suite's pure helpers: verdicts against targets, RESULTS.md, the
PNG chart, alternating runs with failures kept, and `--only` selection."""

import struct
import zlib

import pytest

from bench import common, report
from bench.common import Summary
from bench.report import MISS, PASS, Case, Target


def _case(key, ours, ref=None, target=None, higher=True, unit="MB/s", group="WireGuard mode"):
    return Case(key, group, key, Summary(f"tsproxy {key}", unit, list(ours)),
                None if ref is None else Summary(f"sing-box {key}", unit, list(ref)),
                higher_is_better=higher, target=target)


def test_verdicts_for_each_kind_of_target():
    single = _case("single", [50, 60, 70], [55, 60, 65], Target(">=", 1.0, label="sing-box"))
    slower = _case("slow", [40], [100], Target(">=", 0.75, label="tailscaled"))
    streams = _case("streams", [66], [80], Target(">=", 1.0, "single", "single stream"))
    rss = _case("rss", [37.5], [40], Target("<=", 50, "abs"), higher=False, unit="MB")
    p99 = _case("p99", [16], [10], Target("<=", 1.5, label="sing-box"), higher=False, unit="ms")
    empty = _case("empty", [], [10], Target(">=", 1.0, label="sing-box"))
    plain = _case("plain", [1], [2])
    by = {c.key: c for c in (single, slower, streams, rss, p99, empty, plain)}
    assert report.verdict(single, by) == (pytest.approx(1.0), PASS)        # 1.0x meets >= 1.0
    assert report.verdict(slower, by) == (pytest.approx(0.4), MISS)
    assert report.verdict(streams, by) == (pytest.approx(1.1), PASS)       # 66 / 60
    assert report.verdict(rss, by) == (37.5, PASS)
    assert report.verdict(p99, by) == (pytest.approx(1.6), MISS)
    assert report.verdict(empty, by) == (None, MISS)                       # no data is no pass
    assert report.verdict(plain, by) == (None, "")
    assert report.ratio(plain) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        Target("==", 1).holds(1)


def test_table_rows_show_ranges_failures_and_targets():
    ok = _case("socks5 download", [50, 70, 60], [100, 120, 140], Target(">=", 1.0, label="sing-box"))
    ok.ours.errors.append("RuntimeError: curl rc=28")
    rss = _case("RSS idle", [37.25], [39.6], Target("<=", 50, "abs"), higher=False, unit="MB")
    r_ok, r_rss = report.table_rows([ok, rss])
    assert r_ok["ours"] == "60.0 [50.0..70.0]" and r_ok["ref"] == "120 [100..140]"
    assert r_ok["runs"] == "3 (1 failed) / 3"
    assert (r_ok["ratio"], r_ok["target"], r_ok["verdict"]) == ("0.50", ">= 1.00x sing-box", MISS)
    assert r_rss["target"] == "<= 50 MB (is 37.2)" and r_rss["verdict"] == PASS
    assert r_rss["better"] == "lower"
    assert report.fmt_summary(Summary("x", "MB/s", [], ["E: boom"])) == "no data (1 failed)"


def test_render_markdown_has_notes_groups_verdicts_and_every_failure():
    a = _case("socks5 download", [60], [50], Target(">=", 1.0, label="sing-box"))
    a.ref.errors.append("RuntimeError: HTTP 502")
    b = _case("direct download", [30], [100], Target(">=", 0.75, label="tailscaled"),
              group="Tailnet mode vs tailscaled")
    b.ref.label = "tailscaled direct download"
    fail = report.failure_case("tn.tailnet-derp", "Tailnet mode vs tailscaled", "tailnet-derp",
                               RuntimeError("tailscale up failed"), "tsproxy", "tailscaled")
    md = report.render_markdown([a, b, fail], {"cpus": 2, "kernel": "6.1"},
                                command="python -m bench --quick", chart="results.png")
    assert "    python -m bench --quick" in md and "- cpus: 2" in md and "- kernel: 6.1" in md
    assert "Targets: 1 PASS, 2 MISS." in md
    assert "## WireGuard mode" in md and "## Tailnet mode vs tailscaled" in md
    assert "| tsproxy | tailscaled |" in md                     # the anchor names its column
    assert "| socks5 download | MB/s | 60.0 [60.0..60.0] | 50.0 [50.0..50.0] | 1 / 1 (1 failed) " \
           "| 1.20 | higher | >= 1.00x sing-box | PASS |" in md
    assert "| tailnet-derp (failed) |" in md and "tailscale up failed" in md
    assert "- socks5 download, sing-box: RuntimeError: HTTP 502" in md
    assert "![ratios](results.png)" in md


def test_failures_shared_by_several_rows_are_listed_once():
    out = {"tsproxy": [RuntimeError("3 of 50 connections failed")], "sing-box": [{"rate": 9.0, "p50": 1.0}]}
    rows = [Case(k, "G", k, common.to_summary(f"tsproxy {k}", "x", out["tsproxy"], pick),
                 common.to_summary(f"sing-box {k}", "x", out["sing-box"], pick))
            for k, pick in (("conn/s", lambda r: r["rate"]), ("p50", lambda r: r["p50"]))]
    md = report.render_markdown(rows, {})
    assert md.count("3 of 50 connections failed") == 1


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    ihdr = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(b"IHDR" + ihdr)
    return struct.unpack(">II", ihdr[:8])


def test_write_chart_draws_a_png_with_every_ratio(tmp_path):
    cases = [_case(f"case {i}", [i + 1.0], [2.0], Target(">=", 1.0, label="sing-box") if i % 2 else None)
             for i in range(6)] + [_case("no anchor", [1.0]), _case("no data", [], [1.0])]
    pts = report.chart_points(cases)
    assert [p[0] for p in pts] == [f"WireGuard: case {i} (higher is better)" for i in range(6)]
    assert pts[1] == ("WireGuard: case 1 (higher is better)", 1.0, 1.0, PASS)
    assert pts[0][2:] == (None, "")
    rss = _case("RSS idle", [37.25], [39.6], Target("<=", 50, "abs"), higher=False, unit="MB")
    assert report.chart_points([rss]) == [
        ("WireGuard: RSS idle (lower is better)\n[target <= 50 MB: is 37.2]",
         pytest.approx(37.25 / 39.6), None, PASS)]
    path = report.write_chart(cases + [rss], str(tmp_path / "chart.png"))
    w, h = _png_size(open(path, "rb").read())
    assert w == 1000 and h > 300


def test_alternate_flips_the_order_and_keeps_failures():
    calls = []

    def fn(name, fail_on=None):
        def f():
            calls.append(name)
            if len([c for c in calls if c == name]) == fail_on:
                raise RuntimeError("HTTP 502")
            return float(len(calls))
        return f
    out = common.alternate({"a": fn("a"), "b": fn("b", fail_on=2)}, runs=3, warmup=1, pause=0)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert out["a"] == [4.0, 5.0, 8.0]
    assert isinstance(out["b"][0], RuntimeError) and out["b"][1:] == [6.0, 7.0]
    s = common.to_summary("b", "MB/s", out["b"])
    assert s.values == [6.0, 7.0] and s.errors == ["RuntimeError: HTTP 502"]
    s = common.to_summary("a", "ms", [{"p99": 3}, {"p50": 1}], pick=lambda r: r["p99"])
    assert s.values == [3.0] and s.errors == ["KeyError: 'p99'"]


def test_only_selects_groups_and_modes():
    from bench.__main__ import GROUPS, parse_args
    a = parse_args(["--quick"])
    assert (a.runs, a.size, a.conns, a.groups) == (2, 20, 100, set(GROUPS))
    a = parse_args(["--only", "wg-loss", "--only", "tailnet", "--runs", "5", "--size", "50"])
    assert a.groups == {"wg-loss", "tailnet-direct", "tailnet-conn", "tailnet-derp"}
    assert (a.runs, a.size) == (5, 50)
    with pytest.raises(SystemExit):
        parse_args(["--only", "wg-nothing"])
    with pytest.raises(SystemExit):
        parse_args(["--runs", "0"])


def test_process_figures_from_proc():
    import os
    assert os.getpid() in common.process_tree(os.getpid())
    assert common.rss_kb(os.getpid()) > 1000
    assert common.cpu_seconds(os.getpid()) > 0
