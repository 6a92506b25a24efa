"""The PAC file's rules, checked textually (Chromium runs it for real in tests/interop/test_proxy_real.py)."""

from tsproxy.proxy.pac import PacConfig


def test_pac_routes_tailnet_and_direct_rest():
    pac = PacConfig(suffixes=["tunnel.test."], networks=["10.9.0.0/16", "0.0.0.0/0"],
                    names=["peer"]).render("127.0.0.1", 1055)
    assert pac.startswith("function FindProxyForURL(url, host) {")
    assert 'var P = "SOCKS5 127.0.0.1:1055; SOCKS 127.0.0.1:1055; PROXY 127.0.0.1:1055";' in pac
    assert 'dnsDomainIs(host, ".tunnel.test")' in pac and 'host == "peer"' in pac
    assert 'isInNet(host, "100.64.0.0", "255.192.0.0")' in pac
    assert 'isInNet(host, "10.9.0.0", "255.255.0.0")' in pac
    assert "0.0.0.0" not in pac                        # a default route would proxy everything
    assert 'isInNetEx(host, "fd7a:115c:a1e0::/48")' in pac
    assert 'host.indexOf("fd7a:115c:a1e0:") == 0' in pac
    assert pac.rstrip().endswith('return "DIRECT";\n}')
    assert "dnsResolve" not in pac                     # never leaks names to the host resolver


def test_pac_ipv6_listener_and_hostile_suffix():
    pac = PacConfig(suffixes=['evil"); alert(1); ("x']).render("::1", 1055)
    assert "[::1]:1055" in pac
    assert '"' not in pac.split("dnsDomainIs(host, ")[1].split(")")[0].strip('"')
