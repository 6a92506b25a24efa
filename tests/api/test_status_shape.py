"""node.status() has the shape of the daemon's `tsproxy status --json`, in both modes."""

from tsproxy.daemon import options, runtime
from tsproxy.daemon.tailnet import TailnetPlane
from tsproxy.keys import NodePrivate
from tsproxy.node import Node

WG = f"""[Interface]
PrivateKey = {NodePrivate.generate().b64()}
Address = 100.64.0.9/32

[Peer]
PublicKey = {NodePrivate.generate().public().b64()}
AllowedIPs = 100.64.0.0/10
"""


def _daemon(tmp_path, **flags):
    plan = runtime.prepare(options.merge({"state_dir": str(tmp_path / "st"), **flags},
                                         {"XDG_CONFIG_HOME": str(tmp_path)}))
    return runtime.Daemon(plan)


def test_wireguard_mode_status_keys_match_the_daemon(tmp_path):
    conf = tmp_path / "wg0.conf"
    conf.write_text(WG)
    daemon = _daemon(tmp_path, wg_config=str(conf))
    node = Node(wg_config=WG)
    assert node.status().keys() == daemon.status().keys()
    assert node.status()["mode"] == "wireguard" and node.addresses == ["100.64.0.9"]


def test_tailscale_mode_status_keys_match_the_daemon(tmp_path):
    daemon = _daemon(tmp_path, login_server="http://127.0.0.1:9", hostname="x")
    daemon.tailnet = TailnetPlane(control_url="http://127.0.0.1:9", state_dir=None, hostname="x",
                                  auth_key=None, ephemeral=True)
    node = Node(control_url="http://127.0.0.1:9", hostname="x")
    d, n = daemon.status(), node.status()
    assert n.keys() == d.keys()
    assert n["control"].keys() == d["control"].keys()
    assert n["mode"] == "tailscale" and n["state"] == "NoState" and n["peers"] == []
