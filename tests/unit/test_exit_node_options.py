"""--exit-node, --exit-node-allow-lan-access and --accept-routes as flags, environment, config
file keys and `tsproxy set` (issue #13 items 1-2); DoH framing for the exit node's peer API."""

import pytest

from tsproxy import cli
from tsproxy.daemon import options
from tsproxy.dns import doh
from tsproxy.errors import ConfigError


def merge(flags, tmp_path, env=None, toml=None):
    e = {"XDG_CONFIG_HOME": str(tmp_path), **(env or {})}
    if toml is not None:
        (tmp_path / "c.toml").write_text(toml)
        flags = {"config": str(tmp_path / "c.toml"), **flags}
    return options.merge(flags, e)


def test_flags_env_and_config_file(tmp_path):
    args = cli.build_parser().parse_args(["up", "--exit-node", "tsd", "--exit-node-allow-lan-access",
                                          "--accept-routes"])
    o = merge({k: v for k, v in vars(args).items() if k != "cmd"}, tmp_path)
    assert (o.exit_node, o.exit_node_allow_lan_access, o.accept_routes) == ("tsd", True, True)
    o = merge({}, tmp_path, env={"TSPROXY_EXIT_NODE": "100.64.0.5", "TSPROXY_ACCEPT_ROUTES": "1"})
    assert (o.exit_node, o.accept_routes) == ("100.64.0.5", True)
    o = merge({}, tmp_path, toml='exit-node = "tsd.tailnet.test"\naccept-routes = true\n'
                                 'exit-node-allow-lan-access = true\n')
    assert (o.exit_node, o.accept_routes, o.exit_node_allow_lan_access) == ("tsd.tailnet.test", True, True)
    # flags over the file; "" means none
    o = merge({"exit_node": ""}, tmp_path, toml='exit-node = "tsd"\n')
    assert o.exit_node is None
    assert merge({}, tmp_path).exit_node is None


@pytest.mark.parametrize("flags,toml,msg", [
    ({"exit_node": "a b"}, None, "--exit-node 'a b' is not a node name or IP address"),
    ({}, 'exit-node = "x;y"\n', "line 1: exit-node 'x;y' is not a node name"),
    ({}, "accept-routes = \"yes\"\n", "accept-routes: expected true or false"),
    ({"wg_config": "x.conf", "exit_node": "tsd"}, None, "cannot be combined"),
    ({"wg_config": "x.conf", "accept_routes": True}, None, "cannot be combined"),
    ({"wg_config": "x.conf", "non_tailnet": "exit-node"}, None, "exit-node needs Tailscale mode"),
])
def test_bad_values_name_their_source(tmp_path, flags, toml, msg):
    with pytest.raises(ConfigError, match=msg):
        merge(flags, tmp_path, toml=toml)


def test_non_tailnet_exit_node_refuses_until_one_is_selected(tmp_path):
    from tsproxy.control.routing import RouteTable
    assert merge({"non_tailnet": "exit-node"}, tmp_path).non_tailnet == "exit-node"
    d = RouteTable(policy="exit-node", tailnet_ranges=True).decide("203.0.113.1")
    assert d.kind == "refuse" and "no exit node is selected" in d.reason


def test_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["up", "--help"])
    out = capsys.readouterr().out
    assert "--exit-node NAME|IP" in out and "--exit-node-allow-lan-access" in out
    assert "--accept-routes" in out
    with pytest.raises(SystemExit):
        cli.main(["set", "--help"])
    out = capsys.readouterr().out
    assert '"" to stop using one' in out


def test_set_needs_something_and_checks_values(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["set", "--state-dir", str(tmp_path)])
    assert "nothing to set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["set", "--accept-routes", "maybe", "--state-dir", str(tmp_path)])
    assert "expected true or false" in capsys.readouterr().err
    assert cli.main(["set", "--exit-node", "a;b", "--state-dir", str(tmp_path)]) == 1
    assert "not a node name" in capsys.readouterr().err


def test_status_lines_show_the_exit_node():
    routing = {"policy": "refuse", "accept_routes": True, "allow_lan_access": False, "subnets": [],
               "exit_node": {"selected": "tsd", "name": "tsd", "addresses": ["100.64.0.5"],
                             "usable": True, "problem": None}}
    assert cli.exit_node_line(routing) == "exit node: tsd (100.64.0.5) in use; accepting subnet routes"
    routing["exit_node"].update(usable=False, problem="exit node tsd is offline")
    assert "NOT usable: exit node tsd is offline" in cli.exit_node_text(routing)
    st = {"state": "Running", "mode": "tailscale", "addresses": [], "routing": routing}
    assert "exit node: tsd (100.64.0.5) NOT usable" in cli.format_status(st)
    assert cli.exit_node_text({"policy": "refuse", "exit_node": None}) == \
        "none (outside the tailnet: --non-tailnet refuse)"


def test_doh_request_and_response_framing():
    req = doh.build_request("100.64.0.5", 41641, "/dns-query", b"\x12\x34q")
    head, _, body = req.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /dns-query HTTP/1.1\r\nHost: 100.64.0.5:41641\r\n")
    assert b"Content-Type: application/dns-message" in head and b"Content-Length: 3" in head
    assert b"Connection: close" in head and body == b"\x12\x34q"
    assert doh.split_url("http://[fd7a:115c:a1e0::5]:7/dns-query") == ("fd7a:115c:a1e0::5", 7, "/dns-query")
    with pytest.raises(ValueError):
        doh.split_url("https://x/dns-query")
    ok = (b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\nContent-Length: 4\r\n\r\n"
          b"abcdEXTRA")
    assert doh.parse_response(ok) == b"abcd"
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")
    assert doh.parse_response(chunked) == b"abcd"
    with pytest.raises(doh.DohError, match=r"HTTP 403 \(DNS access denied\)"):
        doh.parse_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 18\r\n\r\nDNS access denied\n")
    for bad in (b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>",
                b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\n"
                b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with pytest.raises(doh.DohError):
            doh.parse_response(bad)


class _FakeStream:
    def __init__(self, answer):
        self.answer, self.sent, self.out = answer, bytearray(), None

    def write(self, data):
        self.sent += data

    def close(self):
        pass

    async def read(self, n):
        if self.out is None:
            head, _, q = bytes(self.sent).partition(b"\r\n\r\n")
            body = self.answer(q)
            self.out = (b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body)) + body
        out, self.out = self.out, b""
        return out


class _FakeNetstack:
    def __init__(self, answer):
        self.answer, self.dialed = answer, []

    async def open_connection(self, host, port, *, timeout):
        self.dialed.append((host, port))
        s = _FakeStream(self.answer)
        return s, s


async def test_doh_resolver_asks_the_peer_api_over_the_tunnel():
    from tsproxy.dns.aio import DohResolver
    from tsproxy.errors import HostUnreachable
    from tsproxy.testing.servers import dns_answer

    ns = _FakeNetstack(lambda q: dns_answer(q, {"page.exit.test": ["198.51.100.10", "2001:db8::10"]}))
    r = DohResolver(ns, lambda: "http://100.64.0.5:41641/dns-query")
    got = await r.resolve("Page.Exit.Test.")
    assert sorted(map(str, got)) == ["198.51.100.10", "2001:db8::10"]
    assert ns.dialed == [("100.64.0.5", 41641)] * 2           # A and AAAA
    assert await r.resolve("page.exit.test") == got and len(ns.dialed) == 2   # cached
    assert await r.resolve("nosuch.test") == []                 # NXDOMAIN: no addresses
    wrong = _FakeNetstack(lambda q: b"\x00\x01" + dns_answer(q, {})[2:])   # another txid
    with pytest.raises(HostUnreachable, match="answer for another query"):
        await DohResolver(wrong, lambda: "http://100.64.0.5:1/dns-query",
                          rng=lambda n: b"\x12\x34").resolve("x.test")
    with pytest.raises(HostUnreachable, match="no DNS-over-HTTPS endpoint"):
        await DohResolver(ns, lambda: "").resolve("x.test")
