"""packaging/tsproxy.service passes `systemd-analyze verify`, and the Dockerfile stays true: a
non-root user, the state dir on a volume, only real TSPROXY_* settings, and a HEALTHCHECK that
succeeds against a running daemon's /healthz and fails without one."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, Daemon, free_port
from tsproxy.daemon.options import UpOptions
from tsproxy.testing.peers import in_ci

SETTINGS = {"TSPROXY_" + n.upper() for n in UpOptions().flag_names()} | {"TSPROXY_STATE_DIR"}


def _read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def test_systemd_user_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        if in_ci():
            pytest.fail("systemd-analyze missing in CI")
        pytest.skip("systemd-analyze not installed")
    unit = _read("packaging", "tsproxy.service")
    assert "ExecStart=%h/.local/bin/tsproxy up --foreground" in unit
    for name in re.findall(r"\b(TSPROXY_[A-Z_]+)=", unit):
        assert name in SETTINGS, name
    # the unit as installed, with %h/.local/bin/tsproxy standing for an executable that exists here
    exe = tmp_path / "tsproxy"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m tsproxy \"$@\"\n")
    exe.chmod(0o755)
    path = tmp_path / "tsproxy.service"
    path.write_text(unit.replace("%h/.local/bin/tsproxy", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "tsproxy.service" not in r.stderr, r.stderr


def _healthcheck(dockerfile: str) -> list[str]:
    m = re.search(r"HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])", dockerfile)
    assert m, "no HEALTHCHECK CMD in the Dockerfile"
    return json.loads(m.group(1))


def test_dockerfile_stays_true(tmp_path):
    d = _read("Dockerfile")
    user = re.findall(r"^USER (\S+)", d, re.M)
    assert user and user[-1] not in ("root", "0")
    env = dict(re.findall(r"(TSPROXY_[A-Z_]+)=(\S+)", d))
    for name in env:
        assert name in SETTINGS, name                 # every variable shown is a real setting
    assert re.search(r'^VOLUME \["%s"\]' % re.escape(env["TSPROXY_STATE_DIR"]), d, re.M)
    assert "TS_AUTHKEY" in d
    assert re.search(r'^CMD \["up", "--foreground"\]', d, re.M)
    cmd = _healthcheck(d)
    assert cmd[0] == "python" and "/healthz" in cmd[-1]


def test_dockerfile_healthcheck_against_a_daemon(tmp_path):
    from tsproxy.testing.tailnet import TestTailnet
    cmd = _healthcheck(_read("Dockerfile"))
    cmd[0] = sys.executable
    port = free_port()
    env = {**os.environ, "TSPROXY_METRICS": f"0.0.0.0:{port}"}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0
    with TestTailnet(host="127.0.0.1") as net:
        d = Daemon(str(tmp_path / "s"), ["--login-server", net.control_url, "--auth-key",
                                         net.auth_key, "--hostname", "docker-like", "--listen", "off",
                                         "--non-tailnet", "refuse", "--metrics", f"127.0.0.1:{port}"])
        d.start(60)
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        finally:
            d.stop()
    assert r.returncode == 0, r.stderr
