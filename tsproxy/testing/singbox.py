"""sing-box as the reference client: userspace WireGuard (gVisor) in its own namespace.

    tspc namespace --veth-- peer namespace (wireguard-go)
    sing-box: WireGuard endpoint to the peer, a mixed (SOCKS5 + HTTP) inbound and a `direct`
    inbound forwarding a local port to the peer's HTTP server: the same jobs tsproxy does.
"""

from __future__ import annotations

import json
import os
import time

from tsproxy.keys import NodePrivate
from tsproxy.testing import netns
from tsproxy.testing.peers import find_binary
from tsproxy.testing.wgpeer import MTU, PEER_IP4, WG_PORT, WireGuardPeer

REF_IP4, REF_IP6 = "100.64.0.3", "fd7a:115c:a1e0::3"
MIXED_PORT = 11080
DIRECT_PORT = 18080


class SingBoxClient:
    def __init__(self, peer: WireGuardPeer, *, direct_target=(PEER_IP4, 80)):
        self.peer = peer
        self.key = NodePrivate.generate()
        self.direct_target = direct_target
        self.ns: netns.Namespace | None = None

    def start(self) -> "SingBoxClient":
        binary = find_binary("sing-box")
        self.ns = ns = netns.Namespace("tspc")
        try:
            my_if, _, my_ip, peer_side_ip = netns.veth_between(ns, self.peer.ns)
            netns.blackhole_default(ns)
            self.peer.add_client(self.key.public().b64(), REF_IP4, REF_IP6)
            conf = {
                "log": {"level": "warn"},
                "endpoints": [{
                    "type": "wireguard", "tag": "wg-ep", "system": False, "mtu": MTU,
                    "address": [f"{REF_IP4}/32", f"{REF_IP6}/128"],
                    "private_key": self.key.b64(),
                    "peers": [{"address": str(peer_side_ip), "port": WG_PORT,
                               "public_key": self.peer.key.public().b64(),
                               "allowed_ips": ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]}],
                }],
                "inbounds": [
                    {"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1", "listen_port": MIXED_PORT},
                    {"type": "direct", "tag": "direct-in", "listen": "127.0.0.1", "listen_port": DIRECT_PORT,
                     "override_address": self.direct_target[0], "override_port": self.direct_target[1]},
                ],
                "outbounds": [{"type": "direct", "tag": "direct"}],
                "route": {"final": "wg-ep", "default_interface": my_if},
            }
            path = os.path.join(self.peer.workdir, "sing-box.json")
            with open(path, "w") as f:
                json.dump(conf, f)
            self.proc = ns.spawn([binary, "run", "-c", path], os.path.join(self.peer.workdir, "sing-box.log"))
            for _ in range(100):
                r = ns.exec(["curl", "-s", "--max-time", "2", "--socks5-hostname", f"127.0.0.1:{MIXED_PORT}",
                             f"http://{PEER_IP4}/"], check=False)
                if r.returncode == 0 and r.stdout.startswith("hello"):
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
            with open(os.path.join(self.peer.workdir, "sing-box.log"), errors="replace") as f:
                raise RuntimeError("sing-box did not come up: " + f.read()[-1500:])
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.ns is not None:
            self.ns.close()
            self.ns = None
            if self.peer.ns is not None:    # forget our key so 100.64.0.3 is free for the next client
                self.peer.ns.exec([find_binary("wg"), "set", self.peer.ifname, "peer",
                                   self.key.public().b64(), "remove"], check=False)
