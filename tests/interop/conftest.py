"""Fixtures for the Tailscale interop modules: a namespace for real Go nodes (no route out)
and a test tailnet (control server + TLS DERP relay) on the root side of its veth."""

import pytest

from tsproxy.testing.peers import require


@pytest.fixture(scope="module")
def go_ns():
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
def tailnet(go_ns):
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host=go_ns.root_ip) as net:
        yield net
