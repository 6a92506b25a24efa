import asyncio
import json
import os
import stat
import subprocess
import sys

import pytest

from tsproxy.daemon import ipc, options, statedir
from tsproxy.errors import ConfigError


def test_precedence_flags_over_env_over_file(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('wg-config = "from-file.conf"\nlisten = "127.0.0.1:2000"\n'
                   'forward = ["1:a:2"]\nnon-tailnet = "refuse"\n')
    env = {"TSPROXY_LISTEN": "127.0.0.1:3000", "TSPROXY_FORWARD": "3:b:4, 5:c:6"}
    o = options.merge({"config": str(cfg)}, env)
    assert (o.wg_config, o.listen, o.forward, o.non_tailnet) == (
        "from-file.conf", "127.0.0.1:3000", ["3:b:4", "5:c:6"], "refuse")
    o = options.merge({"config": str(cfg), "listen": "127.0.0.1:4000", "forward": ["7:d:8"],
                       "wg_config": "flag.conf"}, env)
    assert (o.wg_config, o.listen, o.forward) == ("flag.conf", "127.0.0.1:4000", ["7:d:8"])


def test_default_config_file_is_optional(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    o = options.merge({"wg_config": "x.conf"}, env)
    assert o.listen == "127.0.0.1:1055" and o.config is None


@pytest.mark.parametrize("body,msg", [
    ("bogus = 1\n", "bogus: unknown setting"),
    ("listen = 5\n", "listen: expected a string"),
    ("forward = [1]\n", "forward: expected a string or a list of strings"),
    ("foreground = true\n", "foreground: unknown setting"),
    ("listen = \n", "invalid TOML"),
])
def test_bad_config_file(tmp_path, body, msg):
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as e:
        options.merge({"config": str(cfg), "wg_config": "x"}, {})
    assert str(e.value).startswith(str(cfg)) and msg in str(e.value)


def test_explicit_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        options.merge({"config": str(tmp_path / "none.toml")}, {})


@pytest.mark.parametrize("flags,msg", [
    ({"wg_config": "x", "login_server": "http://127.0.0.1:1"}, "cannot be combined"),
    ({"wg_config": "x", "ephemeral": True}, "cannot be combined"),
    ({"login_server": "ftp://x"}, "must be an http"),
    ({"advertise_tags": ["web"]}, "is not a tag"),
    ({"port": "70000"}, "--port must be"),
    ({"wg_config": "x", "non_tailnet": "maybe"}, "--non-tailnet must be one of"),
    ({"wg_config": "x", "listen": "nohost:1"}, "host must be an IP address"),
    ({"wg_config": "x", "listen": "127.0.0.1:99999"}, "port must be"),
    ({"wg_config": "x", "proxy_user": "u"}, "go together"),
])
def test_validation(flags, msg, tmp_path):
    with pytest.raises(ConfigError, match=msg):
        options.merge(flags, {"XDG_CONFIG_HOME": str(tmp_path)})


def test_tailscale_mode_defaults_and_ts_authkey(tmp_path):
    opts = options.merge({}, {"XDG_CONFIG_HOME": str(tmp_path), "TS_AUTHKEY": "tskey-env"})
    assert opts.wg_config is None and opts.login_server == "https://controlplane.tailscale.com"
    assert opts.auth_key == "tskey-env"
    opts = options.merge({"auth_key": "tskey-flag", "login_server": "http://10.0.0.1:8080/"},
                         {"XDG_CONFIG_HOME": str(tmp_path), "TS_AUTHKEY": "tskey-env"})
    assert opts.auth_key == "tskey-flag" and opts.login_server == "http://10.0.0.1:8080"


def test_auth_key_file(tmp_path):
    from tsproxy.daemon import runtime
    f = tmp_path / "key"
    f.write_text("tskey-from-file\n")
    assert runtime._read_auth_key(f"file:{f}") == "tskey-from-file"
    with pytest.raises(ConfigError, match="cannot read the auth key file") as e:
        runtime._read_auth_key(f"file:{tmp_path / 'missing'}")
    assert "missing" in str(e.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        runtime._read_auth_key(f"file:{tmp_path / 'empty'}")


@pytest.mark.parametrize("text,expect", [
    ("1055", ("127.0.0.1", 1055)), (":1055", ("127.0.0.1", 1055)),
    ("0.0.0.0:8", ("0.0.0.0", 8)), ("[::1]:9", ("::1", 9)), ("localhost:7", ("localhost", 7)),
])
def test_listen_addr(text, expect):
    assert options.parse_listen_addr(text) == expect


def test_state_dir_is_private(tmp_path):
    d = tmp_path / "st"
    d.mkdir(mode=0o755)
    statedir.ensure_state_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    new = statedir.ensure_state_dir(str(tmp_path / "a" / "b"))
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o700


def test_one_daemon_per_state_dir(tmp_path):
    a = statedir.DaemonLock(str(tmp_path))
    a.acquire()
    try:
        # a second process must be refused while the first holds the lock
        code = ("import sys; from tsproxy.daemon.statedir import DaemonLock;"
                f"l = DaemonLock({str(tmp_path)!r});"
                "print(l.is_held_elsewhere());\n"
                "try:\n l.acquire(); print('acquired')\nexcept Exception as e: print(e)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        assert out.splitlines()[0] == "True"
        assert "already running" in out.splitlines()[1]
    finally:
        a.release()
    assert not statedir.DaemonLock(str(tmp_path)).is_held_elsewhere()


async def test_ipc_round_trip_and_bad_requests(tmp_path):
    path = str(tmp_path / "s.sock")
    seen = []

    async def handler(req, reader, writer):
        seen.append(req)
        if req["op"] == "pipe":
            writer.write(b'{"ok": true}\n')
            data = await reader.read(5)
            writer.write(data.upper())
            await writer.drain()
            writer.close()
            return None
        return {"ok": True, "echo": req}

    srv = ipc.IpcServer(path, handler)
    await srv.start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loop = asyncio.get_running_loop()
    resp = await loop.run_in_executor(None, ipc.call, path, {"op": "status", "x": 1})
    assert resp == {"ok": True, "echo": {"op": "status", "x": 1}}

    r, w = await asyncio.open_unix_connection(path)
    w.write(b"not json\n")
    line = await r.readline()
    assert json.loads(line)["ok"] is False and "bad request" in json.loads(line)["error"]
    w.close()

    r, w = await asyncio.open_unix_connection(path)
    w.write(b'{"op": "pipe"}\nhello')
    assert await r.readline() == b'{"ok": true}\n'
    assert await r.read() == b"HELLO"
    w.close()
    await srv.aclose()
    assert not os.path.exists(path)
    with pytest.raises(ipc.DaemonNotRunning):
        ipc.call(path, {"op": "status"})


def _valid_conf(tmp_path):
    from tsproxy.keys import NodePrivate
    conf = tmp_path / "wg0.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {NodePrivate.generate().b64()}\nAddress = 100.64.0.1/32\n"
                    f"[Peer]\nPublicKey = {NodePrivate.generate().public().b64()}\nAllowedIPs = 100.64.0.0/10\n")
    return str(conf)


@pytest.mark.parametrize("listen,ok", [("127.0.0.1:1055", True), ("[::1]:1055", True), ("localhost:1055", True),
                                       ("0.0.0.0:1055", False), ("[::]:1055", False), ("10.1.2.3:1055", False)])
def test_open_proxy_on_a_public_address_is_refused(tmp_path, listen, ok):
    from tsproxy.daemon import runtime
    flags = {"wg_config": _valid_conf(tmp_path), "listen": listen, "state_dir": str(tmp_path / "s")}
    if ok:
        assert runtime.prepare(options.merge(flags, {"XDG_CONFIG_HOME": str(tmp_path)})).listeners
    else:
        with pytest.raises(ConfigError, match="refusing to serve an open proxy"):
            runtime.prepare(options.merge(flags, {"XDG_CONFIG_HOME": str(tmp_path)}))
        # credentials, or the explicit flag, make it acceptable
        pw = tmp_path / "pw"
        pw.write_text("s3cret\n")
        p = runtime.prepare(options.merge({**flags, "proxy_user": "u", "proxy_password_file": str(pw)},
                                          {"XDG_CONFIG_HOME": str(tmp_path)}))
        assert p.proxy_password == "s3cret"
        assert runtime.prepare(options.merge({**flags, "allow_public_without_auth": True},
                                             {"XDG_CONFIG_HOME": str(tmp_path)})).listeners


def test_password_file_errors_never_show_the_password(tmp_path):
    from tsproxy.daemon import runtime
    empty = tmp_path / "empty"
    empty.write_text("")
    flags = {"wg_config": _valid_conf(tmp_path), "proxy_user": "u", "proxy_password_file": str(empty),
             "state_dir": str(tmp_path / "s")}
    with pytest.raises(ConfigError, match="password file is empty"):
        runtime.prepare(options.merge(flags, {"XDG_CONFIG_HOME": str(tmp_path)}))
    with pytest.raises(ConfigError, match="cannot read the proxy password file"):
        runtime.prepare(options.merge({**flags, "proxy_password_file": str(tmp_path / "missing")},
                                      {"XDG_CONFIG_HOME": str(tmp_path)}))
