"""Subnet allocation for test namespaces (no root needed), binary lookup and the CI rule."""

import ipaddress
import os
import subprocess
import sys

import pytest

from tsproxy.testing import impair, netns, peers

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setattr(netns, "LOCK_PATH", str(tmp_path / "lock"))
    monkeypatch.setattr(netns, "REGISTRY_PATH", str(tmp_path / "registry"))
    used = set()
    monkeypatch.setattr(netns, "_addresses_in_use", lambda: set(used))
    return used


def test_allocations_are_distinct_30s_inside_the_pool(registry):
    nets = [netns.allocate_subnet() for _ in range(50)]
    assert len(set(nets)) == 50
    assert all(n.prefixlen == 30 and n.subnet_of(netns.POOL) for n in nets)
    assert set(netns._read_registry()) == {str(n) for n in nets}


def test_root_namespace_addresses_are_avoided(registry):
    # Everything but one /30 is taken by "root namespace" addresses.
    keep = ipaddress.ip_network("10.231.77.8/30")
    registry.update(n for n in netns.POOL.subnets(new_prefix=30) if n != keep)
    assert netns.allocate_subnet() == keep
    with pytest.raises(RuntimeError, match="no free /30"):
        netns.allocate_subnet()


def test_release_and_dead_owner_entries_are_reused(registry):
    registry.update(n for n in netns.POOL.subnets(new_prefix=30))
    free = ipaddress.ip_network("10.231.3.0/30")
    registry.discard(free)
    got = netns.allocate_subnet()
    assert got == free
    netns.release_subnet(got)
    assert netns._read_registry() == {}
    # An entry owned by a process that has exited is pruned at the next allocation.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert netns.allocate_subnet(owner=dead.pid) == free
    assert netns.allocate_subnet() == free
    assert netns._read_registry() == {str(free): os.getpid()}


def test_concurrent_processes_never_share_a_subnet(registry, tmp_path):
    # Real processes (own registry, same lock): the registry, not luck, keeps them apart.
    code = ("import sys, tsproxy.testing.netns as n\n"
            f"n.LOCK_PATH={netns.LOCK_PATH!r}; n.REGISTRY_PATH={netns.REGISTRY_PATH!r}\n"
            "n._addresses_in_use=lambda: set(); n.POOL=n.ipaddress.ip_network('10.231.0.0/26')\n"
            "n.alive=lambda pid: True\n"
            "print(' '.join(str(n.allocate_subnet()) for _ in range(4)))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
             for _ in range(4)]
    got = [s for p in procs for s in p.communicate(timeout=30)[0].split()]
    assert len(got) == 16 and len(set(got)) == 16


def test_unique_names_fit_interface_limit():
    names = {netns.unique("tsr") for _ in range(200)}
    assert len(names) == 200 and all(len(n) <= 15 for n in names)


def test_find_binary_prefers_tsproxy_bin_dir(tmp_path, monkeypatch):
    exe = tmp_path / "wireguard-go"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("TSPROXY_BIN_DIR", str(tmp_path))
    assert peers.find_binary("wireguard-go") == str(exe)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(peers.PeerMissing, match="no-such-peer"):
        peers.find_binary("no-such-peer")


def test_require_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-peer"):
        peers.require("no-such-peer", root=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-peer"):
        peers.require("no-such-peer", root=False)
    peers.require("sh", root=False)              # present: returns quietly


def test_impair_rejects_out_of_range_loss():
    with pytest.raises(ValueError):
        impair.set_loss(object(), 1001)
    with pytest.raises(ValueError):
        impair.set_loss(object(), -1)
