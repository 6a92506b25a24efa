"""The bench suite's report: cases with targets, PASS/MISS verdicts, RESULTS.md and a PNG chart.

Pure functions over `Summary` objects (no root, no network), so tests/unit can check them:

    cases = [Case("wg.socks5.down", "WireGuard vs sing-box", "SOCKS5 download", ours, ref,
                  target=Target(">=", 1.0))]
    text = render_markdown(cases, machine_notes)      # -> bench/RESULTS.md
    write_chart(cases, "bench/results.png")           # needs matplotlib (the `bench` extra)

A target compares one number against a threshold: `basis="ref"` is ours/anchor (medians),
`basis="abs"` is our median itself, any other basis is the key of another case whose tsproxy
median we divide by (8 streams against the single stream).  A target without data is a MISS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.common import Summary

PASS, MISS = "PASS", "MISS"


@dataclass(frozen=True)
class Target:
    op: str                     # ">=" or "<="
    value: float
    basis: str = "ref"          # "ref", "abs" or another case's key
    label: str = ""             # how the basis reads in the table ("sing-box", "single stream")

    def text(self, unit: str = "") -> str:
        if self.basis == "abs":
            return f"{self.op} {self.value:g} {unit}".strip()
        return f"{self.op} {self.value:.2f}x {self.label or self.basis}".strip()

    def holds(self, v: float) -> bool:
        if self.op == ">=":
            return v >= self.value
        if self.op == "<=":
            return v <= self.value
        raise ValueError(f"unknown target operator {self.op!r}")


@dataclass
class Case:
    key: str                    # stable id, e.g. "wg.socks5.down"
    group: str                  # table section, e.g. "WireGuard mode vs sing-box"
    title: str                  # row name
    ours: Summary
    ref: Summary | None = None
    higher_is_better: bool = True
    target: Target | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def ratio(case: Case) -> float | None:
    """tsproxy median / anchor median (None when either is missing or the anchor is 0)."""
    if case.ref is None or case.ours.median is None or not case.ref.median:
        return None
    return case.ours.median / case.ref.median


def verdict(case: Case, by_key: dict[str, Case]) -> tuple[float | None, str]:
    """(the number the target looks at, PASS / MISS / '' without a target)."""
    t = case.target
    if t is None:
        return None, ""
    if t.basis == "ref":
        v = ratio(case)
    elif t.basis == "abs":
        v = case.ours.median
    else:
        other = by_key.get(t.basis)
        v = (case.ours.median / other.ours.median
             if other is not None and case.ours.median is not None and other.ours.median else None)
    if v is None:
        return None, MISS
    return v, PASS if t.holds(v) else MISS


def fmt_num(v: float | None) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_summary(s: Summary | None) -> str:
    """`median [min..max]`, or the failure count when nothing succeeded."""
    if s is None:
        return "-"
    if not s.values:
        return f"no data ({len(s.errors)} failed)" if s.errors else "no data"
    return f"{fmt_num(s.median)} [{fmt_num(min(s.values))}..{fmt_num(max(s.values))}]"


def _runs(s: Summary | None) -> str:
    if s is None:
        return ""
    return f"{len(s.values)}" + (f" ({len(s.errors)} failed)" if s.errors else "")


def table_rows(cases: list[Case]) -> list[dict]:
    """One dict per case with every column as text (the markdown table and the test use it)."""
    by_key = {c.key: c for c in cases}
    rows = []
    for c in cases:
        r = ratio(c)
        v, status = verdict(c, by_key)
        if c.target is None:
            tgt = "-"
        elif c.target.basis == "ref":
            tgt = c.target.text()
        else:
            tgt = f"{c.target.text(c.ours.unit)} (is {fmt_num(v)})"
        rows.append({
            "group": c.group, "key": c.key, "case": c.title, "unit": c.ours.unit,
            "ours": fmt_summary(c.ours), "ref": fmt_summary(c.ref),
            "runs": " / ".join(x for x in (_runs(c.ours), _runs(c.ref)) if x),
            "ratio": "-" if c.ref is None else (f"{r:.2f}" if r is not None else "n/a"),
            "better": "higher" if c.higher_is_better else "lower",
            "target": tgt, "verdict": status or "-", "note": c.note,
        })
    return rows


def render_markdown(cases: list[Case], notes: dict, *, title: str = "tsproxy bench results",
                    command: str = "", chart: str | None = None) -> str:
    """RESULTS.md: machine notes, one table per group, PASS/MISS per target, failures listed."""
    out = [f"# {title}", ""]
    if command:
        out += ["Produced by one command:", "", f"    {command}", ""]
    out += ["Every case alternates tsproxy and its anchor run by run in one process run; "
            "`median [min..max]` over the runs; ratio = tsproxy median / anchor median; "
            "failed runs are counted in the runs column, never dropped. MB = 10^6 bytes.", ""]
    out += ["## Machine", ""] + [f"- {k}: {v}" for k, v in notes.items()] + [""]
    rows = table_rows(cases)
    verdicts = [r["verdict"] for r in rows if r["verdict"] in (PASS, MISS)]
    out += [f"Targets: {verdicts.count(PASS)} PASS, {verdicts.count(MISS)} MISS.", ""]
    if chart:
        out += [f"![ratios]({chart})", ""]
    groups: list[str] = []
    for r in rows:
        if r["group"] not in groups:
            groups.append(r["group"])
    for g in groups:
        anchor = next((c.ref.label.split(" ")[0] for c in cases if c.group == g and c.ref), "anchor")
        out += [f"## {g}", "",
                f"| case | unit | tsproxy | {anchor} | runs | ratio | better | target | verdict |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["group"] == g:
                case = r["case"] + (f" ({r['note']})" if r["note"] else "")
                out.append(f"| {case} | {r['unit']} | {r['ours']} | {r['ref']} | {r['runs']} | "
                           f"{r['ratio']} | {r['better']} | {r['target']} | {r['verdict']} |")
        out.append("")
    failures: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for c in cases:
        for s in (c.ours, c.ref):
            who = s.label.split(" ")[0] if s is not None else ""
            for e in (s.errors if s is not None else []):
                # one run feeding several rows (conn/s, p50, p99) fails once: list it once
                if (c.group, who, e) not in seen:
                    seen.add((c.group, who, e))
                    failures.append(f"- {c.title}, {who}: {e}")
    if failures:
        out += ["## Failed runs", ""] + failures + [""]
    return "\n".join(out)


def chart_points(cases: list[Case]) -> list[tuple[str, float, float | None, str]]:
    """(label, tsproxy/anchor ratio, the target's threshold when it is a ratio vs the anchor,
    verdict) for every case with an anchor and a ratio, in table order."""
    by_key = {c.key: c for c in cases}
    pts = []
    for c in cases:
        r = ratio(c)
        if r is None:
            continue
        v, status = verdict(c, by_key)
        thr = c.target.value if c.target is not None and c.target.basis == "ref" else None
        arrow = "higher" if c.higher_is_better else "lower"
        label = f"{c.group.split(' ')[0]}: {c.title} ({arrow} is better)"
        if c.target is not None and thr is None:     # the colour is about another number
            label += f"\n[target {c.target.text(c.ours.unit)}: is {fmt_num(v)}]"
        pts.append((label, r, thr, status))
    return pts


def write_chart(cases: list[Case], path: str, title: str = "tsproxy / anchor (median ratio)") -> str:
    """A horizontal bar per case: the ratio, coloured by verdict, with the target marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = chart_points(cases)
    colours = {PASS: "#2e7d32", MISS: "#c62828", "": "#78909c"}
    fig, ax = plt.subplots(figsize=(10, 0.34 * max(len(pts), 4) + 1.4), dpi=100)
    ys = list(range(len(pts)))[::-1]
    for y, (label, r, thr, status) in zip(ys, pts):
        ax.barh(y, r, color=colours.get(status, "#78909c"), height=0.7)
        ax.text(r, y, f" {r:.2f}", va="center", fontsize=8)
        if thr is not None:
            ax.plot([thr, thr], [y - 0.4, y + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="#555555", linestyle=":", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([p[0] for p in pts], fontsize=7)
    ax.set_xlabel("tsproxy median / anchor median  (black tick: target; green PASS, red MISS, "
                  "grey no target)", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max([p[1] for p in pts] + [p[2] or 0 for p in pts] + [1.2]) * 1.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def failure_case(key: str, group: str, title: str, err: BaseException, ours: str, ref: str) -> Case:
    """A case whose runs could not happen (setup or the case itself failed): its error is in
    the failed-runs list and its verdict is MISS, so a broken run never looks like a pass."""
    msg = f"{type(err).__name__}: {err}"[:300]
    return Case(key, group, f"{title} (failed)", Summary(f"{ours} {title}", "-", [], [msg]),
                Summary(f"{ref} {title}", "-"), target=Target(">=", 1.0, label=ref))
