"""bench/common.py reporting: medians, ranges, failures kept visible, ratio, JSON output."""

import json

import pytest

from bench import common


def test_summary_line_and_failures_are_reported():
    vals = iter([1.0, 5.0, 3.0, 4.0])

    def f():
        v = next(vals)
        if v == 4.0:
            raise RuntimeError("HTTP 502")
        return v

    s = common.run_repeated("tsproxy", "MB/s", f, runs=3, warmup=1)
    assert s.values == [5.0, 3.0] and s.errors == ["RuntimeError: HTTP 502"]
    assert s.line() == "tsproxy: 4.0 [3.0..5.0] MB/s (n=2, 1 failed)"
    assert common.Summary("x", "MB/s").line() == "x: no successful run"


def test_ratio_line():
    ours = common.Summary("tsproxy", "MB/s", [50.0, 60.0, 70.0])
    ref = common.Summary("sing-box", "MB/s", [100.0, 120.0, 140.0])
    assert common.ratio(ours, ref) == pytest.approx(0.5)
    assert common.ratio_line(ours, ref) == "tsproxy / sing-box: 0.50 (50% of the reference)"
    assert common.ratio_line(ours, common.Summary("r", "MB/s")) == "tsproxy / r: n/a"


def test_save_results_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    path = common.save_results("unit", [common.Summary("a", "req/s", [1.0, 2.0])], {"note": "x"})
    doc = json.load(open(path))
    assert doc["bench"] == "unit" and doc["note"] == "x"
    assert doc["results"][0] == {"label": "a", "unit": "req/s", "median": 1.5, "min": 1.0, "max": 2.0,
                                 "values": [1.0, 2.0], "errors": []}
