"""Every Python example in docs/python-api.md runs here, so the docs cannot rot.

Examples get CONTROL_URL, AUTH_KEY and approve() for the plugin's test tailnet; an example that
defines test functions is a test file of another project and runs under `pytester`, in its own
pytest process that must find the plugin through the installed `pytest11` entry point."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
SCRIPTS = [b for b in BLOCKS if "def test_" not in b]
TEST_FILES = [b for b in BLOCKS if "def test_" in b]


def test_the_doc_has_examples():
    assert len(SCRIPTS) >= 5 and len(TEST_FILES) == 1


@pytest.mark.parametrize("code", SCRIPTS, ids=[f"example{i}" for i in range(len(SCRIPTS))])
def test_example_runs(code, tailnet):
    out = io.StringIO()
    env = {"__name__": "__doc_example__", "CONTROL_URL": tailnet.control_url,
           "AUTH_KEY": tailnet.auth_key, "approve": tailnet.approve}
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{DOC.name} example", "exec"), env)
    assert out.getvalue().strip(), "every example prints what it shows"


def test_plugin_is_registered_through_the_entry_point():
    eps = importlib.metadata.entry_points(group="pytest11")
    assert any(ep.value == "tsproxy.pytest_plugin" for ep in eps), (
        "the tsproxy pytest11 entry point is not installed: run `pip install -e .` again")


def test_outside_project_uses_the_plugin(pytester):
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    pytester.makepyfile(test_outside=TEST_FILES[0])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=1)
