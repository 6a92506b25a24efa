import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from tsproxy.daemon import wgconf
from tsproxy.errors import ConfigError
from tsproxy.keys import NodePrivate

PRIV = NodePrivate.generate()
PEER = NodePrivate.generate().public()
PEER2 = NodePrivate.generate().public()
PSK = NodePrivate.generate().b64()   # any 32 random bytes

GOOD = f"""\
# a comment
[Interface]
PrivateKey = {PRIV.b64()}
Address = 100.64.0.1/32, fd7a:115c:a1e0::1/128
Address = 10.0.0.1/24
MTU = 1380
DNS = 100.64.0.2, fd7a:115c:a1e0::2, corp.example
ListenPort = 51820
PostUp = iptables -A FORWARD   # ignored with a warning
Table = off

[Peer]
PublicKey = {PEER.b64()}
PresharedKey = {PSK}
Endpoint = 10.201.0.2:51820
AllowedIPs = 100.64.0.0/10, fd7a:115c:a1e0::/48
PersistentKeepalive = 25

[peer]
publickey = {PEER2.b64()}
endpoint = [fd00::2]:51821
allowedips = 192.168.7.0/24
"""


def test_parses_every_supported_key():
    c = wgconf.parse(GOOD, "wg0.conf")
    i = c.interface
    assert i.private_key == PRIV
    assert [str(a) for a in i.addresses] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128", "10.0.0.1/24"]
    assert i.mtu == 1380 and i.listen_port == 51820
    assert i.dns_servers == [ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a:115c:a1e0::2")]
    assert i.dns_search == ["corp.example"]
    p1, p2 = c.peers
    assert p1.public_key == PEER and p1.endpoint == ("10.201.0.2", 51820)
    assert p1.preshared_key is not None and len(p1.preshared_key) == 32
    assert [str(n) for n in p1.allowed_ips] == ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
    assert p1.persistent_keepalive == 25
    assert p2.endpoint == ("fd00::2", 51821) and p2.persistent_keepalive == 0
    assert len(c.warnings) == 2
    assert "wg0.conf:9: PostUp" in c.warnings[0] and "Table" in c.warnings[1]


def test_hostname_endpoint_kept_for_later_resolution():
    text = GOOD.replace("10.201.0.2:51820", "vpn.example.com:443")
    assert wgconf.parse(text).peers[0].endpoint == ("vpn.example.com", 443)


@pytest.mark.parametrize("old,new,where", [
    ("ListenPort = 51820", "Frobnicate = 1", "wg0.conf:8: Frobnicate: unknown key in [Interface]"),
    ("MTU = 1380", "MTU = big", "wg0.conf:6: MTU: expected a number"),
    ("MTU = 1380", "MTU = 70000", "wg0.conf:6: MTU: 70000 is out of range"),
    ("Endpoint = 10.201.0.2:51820", "Endpoint = 10.201.0.2", "wg0.conf:15: Endpoint: endpoint '10.201.0.2' needs host:port"),
    ("Endpoint = 10.201.0.2:51820", "Endpoint = fd00::1:51820", "wg0.conf:15: Endpoint: IPv6 endpoint"),
    ("Endpoint = 10.201.0.2:51820", "Endpoint = 10.201.0.2:0", "wg0.conf:15: Endpoint: 0 is out of range"),
    ("AllowedIPs = 100.64.0.0/10, fd7a:115c:a1e0::/48", "AllowedIPs = 100.64.0.0/33", "wg0.conf:16: AllowedIPs: invalid network"),
    ("Address = 10.0.0.1/24", "Address = 10.0.0.300/24", "wg0.conf:5: Address: invalid address"),
    ("[Peer]", "[Perr]", "wg0.conf:12: unknown section [Perr]"),
    ("[Peer]", "[Peer", "wg0.conf:12: malformed section header"),
    ("PersistentKeepalive = 25", "PersistentKeepalive 25", "wg0.conf:17: expected 'Key = value'"),
    ("DNS = 100.64.0.2, fd7a:115c:a1e0::2, corp.example", "DNS = -bad-", "wg0.conf:7: DNS: invalid DNS server"),
])
def test_errors_name_file_line_and_key(old, new, where):
    with pytest.raises(ConfigError) as e:
        wgconf.parse(GOOD.replace(old, new, 1), "wg0.conf")
    assert str(e.value).startswith(where), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_keys_never_echo_the_secret():
    secret = PRIV.b64()[:-2] + "!!"
    with pytest.raises(ConfigError) as e:
        wgconf.parse(GOOD.replace(PRIV.b64(), secret), "wg0.conf")
    assert "wg0.conf:3: PrivateKey: invalid private key" in str(e.value)
    assert secret not in str(e.value) and PRIV.b64()[:10] not in str(e.value)


@pytest.mark.parametrize("text,msg", [
    ("[Peer]\nPublicKey = " + PEER.b64() + "\n", "no [Interface] section"),
    ("[Interface]\nPrivateKey = " + PRIV.b64() + "\nAddress = 10.0.0.1/32\n", "no [Peer] section"),
    ("[Interface]\nAddress = 10.0.0.1/32\n[Peer]\nPublicKey = " + PEER.b64() + "\n", "x:1: [Interface] has no PrivateKey"),
    ("[Interface]\nPrivateKey = " + PRIV.b64() + "\n[Peer]\nPublicKey = " + PEER.b64() + "\n", "x:1: [Interface] has no Address"),
    ("[Interface]\nPrivateKey = " + PRIV.b64() + "\nAddress = 10.0.0.1/32\n[Peer]\nEndpoint = 1.2.3.4:5\n", "x:4: [Peer] has no PublicKey"),
    ("PrivateKey = abc\n", "x:1: PrivateKey: key outside of a section"),
    ("[Interface]\nPrivateKey = " + PRIV.b64() + "\nPrivateKey = " + PRIV.b64() + "\n", "x:3: PrivateKey: given twice"),
])
def test_structural_errors(text, msg):
    with pytest.raises(ConfigError) as e:
        wgconf.parse(text, "x")
    assert msg in str(e.value)


def test_duplicate_peer_rejected():
    text = GOOD + f"[Peer]\nPublicKey = {PEER.b64()}\nAllowedIPs = 10.9.0.0/16\n"
    with pytest.raises(ConfigError, match="duplicate peer"):
        wgconf.parse(text, "x")


def test_load_missing_and_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="nope.conf: file not found"):
        wgconf.load(str(tmp_path / "nope.conf"))
    bad = tmp_path / "bin.conf"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read file"):
        wgconf.load(str(bad))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]=#,.:/ \nInterfacePeerKeyAddressMTU0123456789abcdef")), max_size=300))
def test_fuzz_only_config_errors(text):
    try:
        wgconf.parse(text, "f")
    except ConfigError:
        pass
