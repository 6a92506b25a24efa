"""The control socket's `set` request (`tsproxy set`): checked before anything changes."""

import pytest

from tsproxy.daemon.runtime import Daemon
from tsproxy.errors import ConfigError


class FakeTailnet:
    def __init__(self):
        self.exit_node, self.accept_routes, self.calls = None, False, []

    def set_exit_node(self, value, allow_lan=None):
        self.calls.append(("exit", value, allow_lan))
        self.exit_node = value or None
        return {"exit_node": {"selected": value} if value else None}

    def set_accept_routes(self, on):
        self.calls.append(("routes", on))
        return {"accept_routes": on}


def daemon(tailnet=True):
    d = Daemon.__new__(Daemon)
    d.tailnet = FakeTailnet() if tailnet else None
    return d


def test_set_exit_node_and_routes():
    d = daemon()
    assert d._ipc_set({"op": "set", "exit_node": "tsd"}) == {"ok": True, "routing": {"exit_node": {"selected": "tsd"}}}
    assert d._ipc_set({"op": "set", "exit_node": ""})["ok"]
    assert d._ipc_set({"op": "set", "exit_node_allow_lan_access": True})["ok"]
    assert d._ipc_set({"op": "set", "accept_routes": True})["ok"]
    assert d.tailnet.calls == [("exit", "tsd", None), ("exit", "", None), ("exit", None, True),
                               ("routes", True)]


@pytest.mark.parametrize("req,msg", [
    ({"exit_node": 5}, "exit_node must be"),
    ({"accept_routes": "yes"}, "accept_routes must be true or false"),
    ({"exit_node_allow_lan_access": 1}, "must be true or false"),
    ({"bogus": 1}, "unknown setting 'bogus'"),
])
def test_bad_set_requests_change_nothing(req, msg):
    d = daemon()
    r = d._ipc_set({"op": "set", **req})
    assert not r["ok"] and msg in r["error"] and d.tailnet.calls == []


def test_bad_exit_node_name_and_wireguard_mode():
    d = daemon()
    with pytest.raises(ConfigError, match="not a node name"):
        d._ipc_set({"op": "set", "exit_node": "a b"})
    assert d.tailnet.calls == []
    r = daemon(tailnet=False)._ipc_set({"op": "set", "exit_node": "tsd"})
    assert not r["ok"] and "plain WireGuard mode" in r["error"]
