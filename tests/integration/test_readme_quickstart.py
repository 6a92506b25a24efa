"""The README's quick start, verbatim, on a fresh copy of the checkout: its first command makes a
new virtual environment, installs tsproxy from the local files, and runs the demo, whose printed
curl line then fetches the demo peer's page.  No root."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def quick_start_commands() -> list[str]:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [ln.strip().split("  #", 1)[0].strip() for ln in section.splitlines()
            if ln.startswith("    ") and ln.strip().startswith("bash ")]


def test_readme_has_no_sudo_and_starts_with_the_rootless_demo():
    with open(os.path.join(REPO, "README.md")) as f:
        assert "sudo" not in f.read()
    cmds = quick_start_commands()
    assert cmds[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_quick_start_first_command_in_a_fresh_checkout(tmp_path):
    copy = tmp_path / "tsproxy"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "__pycache__", "*.egg-info", ".pytest_cache", "build"))
    wheelhouse = os.environ.get("TSPROXY_WHEELHOUSE", os.path.join(REPO, ".cache", "wheelhouse"))
    if not os.path.isfile(os.path.join(wheelhouse, ".complete")):
        msg = f"no offline wheelhouse at {wheelhouse} (scripts/test.sh fills it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # tests reach no package registry: pip installs from the wheels the install step fetched
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=wheelhouse)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(REPO + os.sep))   # not our .venv/bin
    cmd = quick_start_commands()[0] + " --listen 127.0.0.1:0"
    p = subprocess.Popen(shlex.split(cmd), cwd=copy, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        deadline = time.monotonic() + 800
        curl = None
        while time.monotonic() < deadline and curl is None:
            line = p.stdout.readline()
            if not line:
                raise AssertionError(f"demo.sh exited {p.wait()}: {''.join(out)}")
            out.append(line)
            if line.strip().startswith("curl --socks5-hostname"):
                curl = line.strip()
        assert curl, "".join(out)
        assert (copy / ".venv" / "bin" / "tsproxy").exists()
        r = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Hello from demo-peer" in r.stdout, r.stderr
    finally:
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=60)
    assert p.returncode == 0, rest
    assert re.search(r"demo stopped; removed \S+", rest), rest
