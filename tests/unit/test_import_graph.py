"""Enforce DESIGN.md section 2: imports flow one way, and sans-IO cores stay sans-IO.

Every `tsproxy` module is parsed (not imported) and each `import`/`from ... import` is
checked: a module may import only its own package or packages of a strictly lower rank,
and only `aio.py` (or an `aio/` subpackage), `daemon/`, `testing/`, `cli.py` and `__main__.py` may touch the event
loop, sockets, TLS, the clock or global randomness.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tsproxy"

RANK = {
    "errors": 0, "version": 0, "aio": 0,
    "keys": 1, "netdial": 1,
    "noise": 2,
    "control": 3, "derp": 3, "disco": 3, "wg": 3,
    "magicsock": 4, "netstack": 4, "dns": 4,
    "tlsconfig": 1,
    "proxy": 5,
    "daemon": 6, "httpx_transport": 6,
    "testing": 7, "node": 7,
    "cli": 8, "sync": 8, "pytest_plugin": 8, "__main__": 9, "__init__": 9,
}

IO_MODULES = {"asyncio", "socket", "ssl", "time", "random", "selectors", "select",
              "threading", "subprocess", "uvloop"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        yield path, rel.parts


def _top(parts):
    first = parts[0]
    return first[:-3] if first.endswith(".py") else first


def _io_allowed(parts):
    return (parts[-1] == "aio.py" or "aio" in parts[:-1] or parts[0] in ("daemon", "testing")
            or parts == ("cli.py",) or parts == ("__main__.py",)
            or parts in API_EDGES)


# the Python API (tsproxy.Node and friends) is an edge like the daemon: asyncio, sockets, ssl
API_EDGES = {("node.py",), ("sync.py",), ("httpx_transport.py",), ("pytest_plugin.py",)}


def _imports(path, parts):
    tree = ast.parse(path.read_text(), str(path))
    pkg = ["tsproxy", *parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                if not node.module:
                    for alias in node.names:
                        yield node.lineno, name + "." + alias.name
                    continue
            else:
                name = node.module
            yield node.lineno, name


def test_rank_table_covers_every_top_level_package():
    tops = {_top(parts) for _, parts in _modules()}
    missing = tops - RANK.keys()
    assert not missing, f"add these to RANK in {__file__}: {sorted(missing)}"


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda v: str(v) if isinstance(v, tuple) else None)
def test_imports_flow_one_way(path, parts):
    me = _top(parts)
    problems = []
    for lineno, name in _imports(path, parts):
        root = name.split(".")[0]
        if root == "tsproxy":
            segs = name.split(".")
            if len(segs) == 1:
                problems.append(f"line {lineno}: bare 'import tsproxy'")
                continue
            other = segs[1]
            if other == me:
                continue
            if other not in RANK:
                continue  # a name imported from tsproxy/__init__ is caught by the rank test
            if RANK[other] >= RANK[me]:
                problems.append(f"line {lineno}: {me} (rank {RANK[me]}) imports {name} (rank {RANK[other]})")
        elif root in IO_MODULES and not _io_allowed(parts):
            problems.append(f"line {lineno}: sans-IO module imports {name}")
    assert not problems, f"{path.relative_to(ROOT.parent)}:\n" + "\n".join(problems)


def test_checker_catches_violations(tmp_path):
    """The walker itself must be able to fail."""
    bad = tmp_path / "x.py"
    bad.write_text("import asyncio\nfrom tsproxy.daemon import runtime\nfrom ..proxy import socks5\n")
    found = [n for _, n in _imports(bad, ("wg", "peer.py"))]
    assert "asyncio" in found and "tsproxy.daemon" in found and "tsproxy.proxy" in found
