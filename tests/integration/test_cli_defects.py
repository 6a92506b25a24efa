"""Regression tests for what a new user tripped on (issue 10 item 5), through the real CLI on
the loopback test tailnet, no root.  Each failed before its fix."""

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status
from tsproxy.daemon import ipc, options, statedir
from tsproxy.errors import ConfigError

pytestmark = [pytest.mark.timeout(300)]
BASE = ["--non-tailnet", "refuse"]


def tsp(*args, env=None, timeout=60, **kw):
    full_env = {k: v for k, v in os.environ.items() if k not in ("TS_AUTHKEY",)}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tsproxy", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env, **kw)


@pytest.fixture(scope="module")
def node(tailnet, web, tmp_path_factory):
    """tsp-a with a proxy port; tsp-b serving a page on tailnet port 8080."""
    b = Daemon(str(tmp_path_factory.mktemp("b")),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "tsp-b", "--listen", "off", "--reverse", f"8080:127.0.0.1:{web}", *BASE])
    a = Daemon(str(tmp_path_factory.mktemp("a")),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "tsp-a", "--listen", f"127.0.0.1:{free_port()}", *BASE])
    try:
        b.start(timeout=60)
        a.start(timeout=60)
        eventually(lambda: peer_status(a, "tsp-b"), 30, "tsp-b in tsp-a's netmap")
        yield a
    finally:
        a.stop()
        b.stop()


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().decode(errors="replace")


def _gone(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_detached_daemon_has_no_auth_key_in_its_command_line_and_down_waits(tailnet, tmp_path, how):
    key = tailnet.call(lambda: tailnet.control.create_auth_key(reusable=True).key)
    sd = str(tmp_path / "sd")
    args = ["up", "--state-dir", sd, "--login-server", tailnet.control_url,
            "--hostname", f"detached-{how}", "--listen", "off", *BASE]
    env = {}
    if how == "flag":
        args += ["--auth-key", key]
    elif how == "env":
        env["TS_AUTHKEY"] = key
    else:
        kf = tmp_path / "key"
        kf.write_text(key + "\n")
        args += ["--auth-key", f"file:{kf}"]
    r = tsp(*args, env=env)
    assert r.returncode == 0, r.stderr
    pid = ipc.call(statedir.socket_path(sd), {"op": "status"})["pid"]
    try:
        assert key not in _cmdline(pid) and "--auth-key" not in _cmdline(pid)
        assert key not in _environ(pid)
        assert "TSPROXY_AUTH_KEY_FD" not in _environ(pid) or True   # a number, not a secret
    finally:
        r = tsp("down", "--state-dir", sd)
    assert (r.returncode, r.stdout) == (0, "tsproxy stopped\n"), r.stderr
    assert _gone(pid)                           # `down` returned after the daemon exited
    with open(statedir.log_path(sd)) as f:
        assert key not in f.read()


def test_up_with_proxy_port_in_use_fails_before_registering(tailnet, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = tsp("up", "--state-dir", str(tmp_path / "sd"), "--login-server", tailnet.control_url,
                "--auth-key", tailnet.auth_key, "--hostname", "portbusy",
                "--listen", f"127.0.0.1:{port}", *BASE)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert tailnet.node("portbusy") is None      # never registered: nobody sees it offline


def test_forward_port_in_use_fails_before_registering(tailnet, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = tsp("up", "--foreground", "--state-dir", str(tmp_path / "sd"), "--login-server",
                tailnet.control_url, "--auth-key", tailnet.auth_key, "--hostname", "fwbusy",
                "--listen", "off", "--forward", f"{port}:tsp-b:8080", *BASE)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert tailnet.node("fwbusy") is None


def test_up_with_udp_port_in_use_fails_before_registering(tailnet, tmp_path):
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        port = s.getsockname()[1]
        r = tsp("up", "--state-dir", str(tmp_path / "sd"), "--login-server", tailnet.control_url,
                "--auth-key", tailnet.auth_key, "--hostname", "udpbusy", "--port", str(port),
                "--listen", "off", *BASE)
    assert r.returncode == 1
    assert f"cannot open the UDP port {port}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert tailnet.node("udpbusy") is None


@pytest.mark.parametrize("argv,rc", [(["status"], 141), (["status", "--json"], 141),
                                     (["whois", "100.64.0.1"], 141), (["version"], 141),
                                     (["--help"], 0), (["status", "--help"], 0)])
def test_no_traceback_when_the_reader_goes_away(node, argv, rc):
    """`tsproxy status | head -1`: the reader closes the pipe before we write."""
    rfd, wfd = os.pipe()
    os.close(rfd)                                # the reader is gone before we write a byte
    p = subprocess.run([sys.executable, "-m", "tsproxy", *argv, *(
        ["--state-dir", node.state_dir] if argv[0] in ("status", "forward", "whois")
        and "--help" not in argv else [])], cwd=REPO, stdout=wfd, stderr=subprocess.PIPE,
        text=True, timeout=30)
    os.close(wfd)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.returncode == rc


def test_status_piped_to_head(node):
    r = subprocess.run(f"{sys.executable} -m tsproxy status --state-dir {node.state_dir} | head -1",
                       shell=True, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("state:") and r.stderr == ""


def test_forward_listeners_loopback_unless_told(node):
    sd = ["--state-dir", node.state_dir]
    port = free_port()
    r = tsp("forward", f"0.0.0.0:{port}:tsp-b:8080", *sd)
    assert r.returncode == 1 and f"refusing to open forward '0.0.0.0:{port}:tsp-b:8080' on 0.0.0.0" \
        in r.stderr, r.stderr
    r = tsp("forward", "0:tsp-b:8080", *sd)
    assert r.returncode == 1 and "listen port 0 is not allowed" in r.stderr, r.stderr


def test_up_forward_non_loopback_refused(tailnet, tmp_path):
    r = tsp("up", "--state-dir", str(tmp_path / "sd"), "--login-server", tailnet.control_url,
            "--hostname", "x", "--listen", "off", "--forward", "0.0.0.0:4567:tsp-b:80", *BASE)
    assert r.returncode == 1
    assert "refusing to open forward '0.0.0.0:4567:tsp-b:80' on 0.0.0.0" in r.stderr, r.stderr
    r = tsp("up", "--state-dir", str(tmp_path / "sd"), "--login-server", tailnet.control_url,
            "--hostname", "x", "--listen", "off", "--forward", "0:tsp-b:80", *BASE)
    assert r.returncode == 1
    assert "--forward '0:tsp-b:80': listen port 0 is not allowed" in r.stderr, r.stderr


def test_forward_to_unknown_name_warns_and_logs_once(node):
    sd = ["--state-dir", node.state_dir]
    port = free_port()
    r = tsp("forward", f"{port}:nosuchpeer:80", *sd)
    assert r.returncode == 0
    assert "warning: nosuchpeer is not a name on the tunnel now" in r.stderr, r.stderr
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.settimeout(10)
                try:
                    assert c.recv(100) == b""
                except ConnectionResetError:
                    pass                          # reset: the forward could not connect
        listed = eventually(lambda: (lambda out: out if "last error" in out else None)(
            tsp("forward", "--list", *sd).stdout), 10, "forward's last error")
        assert f"127.0.0.1:{port} -> nosuchpeer:80 (last error: nosuchpeer:80 is not on the tunnel" \
            in listed, listed
        with open(node.log_path) as f:
            logged = [ln for ln in f if f"forward {port}:nosuchpeer:80:" in ln]
        assert len(logged) == 1, logged
    finally:
        tsp("forward", "--remove", str(port), *sd)


def test_forward_list_and_status_keep_the_udp_marker(node):
    sd = ["--state-dir", node.state_dir]
    port = free_port()
    r = tsp("forward", f"udp:{port}:tsp-b:53", *sd)
    assert r.returncode == 0 and r.stdout == f"udp:127.0.0.1:{port} -> tsp-b:53\n", r.stderr
    try:
        assert f"udp:127.0.0.1:{port} -> tsp-b:53" in tsp("forward", "--list", *sd).stdout
        assert f"forward:   udp:127.0.0.1:{port} -> tsp-b:53" in tsp("status", *sd).stdout
    finally:
        assert tsp("forward", "--remove", f"udp:{port}", *sd).returncode == 0


def test_ipv6_destination_in_errors_has_brackets(node):
    r = tsp("nc", "--state-dir", node.state_dir, "fd7a:115c:a1e0::fe", "81", input="", timeout=60)
    assert r.returncode == 1
    assert "[fd7a:115c:a1e0::fe]:81" in r.stderr and "fd7a:115c:a1e0::fe:81" not in r.stderr, r.stderr


def test_offline_peer_nc_status_and_up_summary(node, tailnet, tmp_path):
    gone = Daemon(str(tmp_path / "gone"), ["--login-server", tailnet.control_url, "--auth-key",
                                           tailnet.auth_key, "--hostname", "a-very-long-peer-name",
                                           "--listen", "off", *BASE]).start(timeout=60)
    eventually(lambda: peer_status(node, "a-very-long-peer-name"), 30, "new peer seen")
    gone.stop()
    eventually(lambda: (peer_status(node, "a-very-long-peer-name") or {}).get("online") is False,
               60, "peer offline in the netmap")
    r = tsp("nc", "--state-dir", node.state_dir, "a-very-long-peer-name", "80", input="")
    assert (r.returncode, r.stderr) == (1, "tsproxy: a-very-long-peer-name is offline\n")
    r = tsp("ping", "--state-dir", node.state_dir, "a-very-long-peer-name")
    assert (r.returncode, r.stderr) == (1, "tsproxy: a-very-long-peer-name is offline\n")
    # status: the path column starts at the same place in every row
    table = tsp("status", "--state-dir", node.state_dir).stdout.split("\n\n", 1)[1].splitlines()
    assert any("(offline)" in ln for ln in table)
    starts = {ln.index(ln.split()[2] if ln.split()[1] == "(offline)" else ln.split()[1])
              for ln in table}
    assert len(starts) == 1, table
    # up's summary counts only peers that are online (tsp-a and tsp-b; not the offline one)
    sd = str(tmp_path / "late")
    r = tsp("up", "--state-dir", sd, "--login-server", tailnet.control_url, "--auth-key",
            tailnet.auth_key, "--hostname", "late", "--listen", "off", *BASE)
    try:
        assert r.returncode == 0, r.stderr
        n = tailnet.call(lambda: sum(1 for nd in tailnet.control.registry.nodes.values()
                                     if nd.hostname != "late" and nd.online))
        assert r.stdout.rstrip().endswith(f"; {n} peer{'s' if n != 1 else ''} online"), r.stdout
    finally:
        tsp("down", "--state-dir", sd)


def test_config_and_env_errors_name_their_source(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('# tsproxy\nlisten = "127.0.0.1:1055"\nnon-tailnet = "sideways"\n')
    with pytest.raises(ConfigError) as e:
        options.merge({"config": str(cfg)}, environ={})
    assert str(e.value) == (f"{cfg} line 3: non-tailnet: must be one of direct, refuse, "
                            "exit-node, not 'sideways'")
    with pytest.raises(ConfigError) as e:
        options.merge({}, environ={"TSPROXY_LISTEN": "nowhere"})
    assert str(e.value).startswith("TSPROXY_LISTEN: listen address 'nowhere'")
    with pytest.raises(ConfigError) as e:
        options.merge({"listen": "nowhere"}, environ={"TSPROXY_LISTEN": "127.0.0.1:1"})
    assert str(e.value).startswith("--listen listen address 'nowhere'")
    r = tsp("up", "--state-dir", str(tmp_path / "sd"), "--config", str(cfg))
    assert r.returncode == 1 and "config.toml line 3: non-tailnet: must be one of" in r.stderr


def test_every_argument_has_help_and_bad_flags_show_the_subcommand_usage():
    from tsproxy.cli import build_parser
    parser = build_parser()
    for name, sp in parser.sub.choices.items():
        for action in sp._actions:
            if action.dest != "help":
                assert action.help, f"tsproxy {name} {action.option_strings or action.dest}: no help"
    for cmd in ("status", "down", "forward", "ping", "up", "nc", "whois", "demo"):
        r = tsp(cmd, "--no-such-flag")
        assert r.returncode == 2
        assert r.stderr.startswith(f"usage: tsproxy {cmd} "), r.stderr
        assert f"\ntsproxy {cmd}: error: " in r.stderr, r.stderr
    for cmd in ("status", "down", "forward", "up", "demo"):
        r = tsp(cmd, "--no-such-flag")
        assert f"tsproxy {cmd}: error: unrecognized arguments: --no-such-flag" in r.stderr
