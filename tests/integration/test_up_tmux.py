"""`tsproxy up` in a real terminal (tmux) during an interactive login: it shows the login URL,
keeps waiting while nobody has approved, and returns with its one-line summary once approved."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import REPO
from tests.tailnet_helpers import eventually
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(180)]


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        require("tmux", root=False)
    sock = f"tsproxy-test-{os.getpid()}"          # our own tmux server: never touch anyone else's
    run = lambda *a: subprocess.run(["tmux", "-L", sock, *a], capture_output=True, text=True,
                                    timeout=20)
    yield run
    run("kill-server")


def test_up_shows_login_url_in_a_terminal_and_returns_after_approval(tmux, tmp_path):
    from tsproxy.testing.tailnet import TestTailnet
    state = str(tmp_path / "state")
    with TestTailnet(host="127.0.0.1") as net:
        cmd = (f"cd {shlex.quote(REPO)} && {shlex.quote(sys.executable)} -m tsproxy up "
               f"--login-server {net.control_url} --hostname tmux-node --listen off "
               f"--non-tailnet refuse --state-dir {shlex.quote(state)}; echo EXIT=$?; sleep 300")
        r = tmux("new-session", "-d", "-s", "up", "-x", "200", "-y", "50", cmd)
        assert r.returncode == 0, r.stderr
        screen = lambda: tmux("capture-pane", "-p", "-J", "-t", "up").stdout
        text = eventually(lambda: (lambda s: s if "/register/" in s else None)(screen()), 60,
                          "login URL on the terminal")
        assert "To authenticate, visit:" in text
        url = re.search(r"(http://\S+/register/\S+)", text).group(1)
        assert "EXIT=" not in screen() and "tsproxy is up" not in screen()
        urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=10)
        text = eventually(lambda: (lambda s: s if "EXIT=" in s else None)(screen()), 60,
                          "up returned")
        assert "EXIT=0" in text and "tsproxy is up as tmux-node.tailnet.test" in text, text
        try:
            assert net.node("tmux-node") is not None
        finally:
            subprocess.run([sys.executable, "-m", "tsproxy", "down", "--state-dir", state],
                           cwd=REPO, timeout=60)
