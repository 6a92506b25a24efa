"""Write the seed corpus: `python fuzz/make_corpus.py [DIR]` (default fuzz/corpus/).

One directory per target in fuzz/targets.py, each seed a valid message (or a valid message
sequence) in the framing that target expects, so coverage-guided runs start past the
framing checks.  Deterministic: fixed keys and nonces.
"""

import ipaddress
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import targets as T  # noqa: E402


def _chunks(*parts: bytes) -> bytes:
    """The 2-byte length-prefixed sequence targets split with _split()."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def _a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _packets():
    from tsproxy.netstack.wire import icmp, udp
    from tsproxy.netstack.wire import tcp as W
    a4, b4, a6, b6 = _a("10.0.0.2"), _a("10.0.0.1"), _a("fd00::2"), _a("fd00::1")
    syn = W.Packetizer(a4, b4, 40000, 80).build(1000, 0, W.SYN, 65535, W.syn_options(1360, 7, True))
    syn6 = W.Packetizer(a6, b6, 40000, 80).build(1000, 0, W.SYN, 65535, W.syn_options(1340, 7, True))
    ack = W.Packetizer(a4, b4, 40000, 80).build(1001, 1, W.ACK, 65535, W.sack_option([(5, 9)]), b"data")
    u4 = udp.build(a4, b4, 5353, 53, b"\0" * 12)
    u6 = udp.build(a6, b6, 5353, 53, b"\0" * 12)
    echo = icmp.echo_reply(4, a4, b4, bytes((8, 0, 0, 0, 0, 1, 0, 1)) + b"ping")
    echo = echo[:20] + bytes((8,)) + echo[21:]
    unreach = icmp.port_unreachable(4, a4, b4, bytes(syn))
    unreach6 = icmp.port_unreachable(6, a6, b6, bytes(syn6))
    return [bytes(p) for p in (syn, syn6, ack, u4, u6, echo, unreach, unreach6)]


_MAP = {
    "ControlTime": "2026-01-01T00:00:00Z",
    "Node": {"ID": 1, "StableID": "n1", "Name": "me.tailnet.test.", "Key": "nodekey:" + "01" * 32,
             "KeyExpiry": "2027-01-01T00:00:00Z", "Machine": "mkey:" + "02" * 32,
             "DiscoKey": "discokey:" + "03" * 32, "Addresses": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
             "AllowedIPs": ["100.64.0.1/32"], "HomeDERP": 1, "MachineAuthorized": True},
    "Peers": [{"ID": 2, "StableID": "n2", "Name": "peer.tailnet.test.", "Key": "nodekey:" + "04" * 32,
               "DiscoKey": "discokey:" + "05" * 32, "Addresses": ["100.64.0.2/32"],
               "AllowedIPs": ["100.64.0.2/32", "10.1.0.0/16"], "Endpoints": ["192.0.2.2:41641"],
               "HomeDERP": 1, "Online": True, "Tags": ["tag:web"]}],
    "DERPMap": {"Regions": {"1": {"RegionID": 1, "RegionCode": "t", "RegionName": "test",
                                  "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "127.0.0.1",
                                             "IPv4": "127.0.0.1", "DERPPort": 3340, "STUNPort": -1,
                                             "InsecureForTests": True}]}}},
    "DNSConfig": {"Resolvers": [{"Addr": "1.1.1.1"}], "Routes": {"corp.test.": [{"Addr": "10.1.0.53"}]},
                  "Domains": ["tailnet.test"], "ExtraRecords": [{"Name": "x.tailnet.test.", "Value": "100.64.0.9"}]},
    "Domain": "tailnet.test",
    "PacketFilter": [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}],
    "UserProfiles": [{"ID": 1, "LoginName": "u@test"}],
}
_DELTA = {"PeersChangedPatch": [{"NodeID": 2, "DERPRegion": 2, "Endpoints": ["192.0.2.3:1"], "Online": False}],
          "PeersRemoved": [3], "OnlineChange": {"2": True}, "PeerSeenChange": {"2": False}}

_WG_CONF = """[Interface]
PrivateKey = {priv}
Address = 10.0.0.1/32, fd00::1/128
DNS = 10.0.0.53, corp.test
MTU = 1420
ListenPort = 51820

[Peer]
PublicKey = {pub}
PresharedKey = {psk}
AllowedIPs = 10.0.0.0/24, fd00::/64
Endpoint = [2001:db8::1]:51820
PersistentKeepalive = 25
"""

_TOML = """login-server = "http://127.0.0.1:8080"
hostname = "fuzz"
listen = "127.0.0.1:1055"
socks5 = ["127.0.0.1:1080"]
http-proxy = "127.0.0.1:8118"
forward = ["127.0.0.1:2222=peer:22"]
advertise-tags = ["tag:web"]
ephemeral = true
non-tailnet = "refuse"
log-level = "debug"
"""


def _dns_response() -> bytes:
    from tsproxy.dns import message as m
    q = bytearray(m.build_query(0x1234, "peer.tailnet.test", m.TYPE_A))
    q[2] |= 0x80                              # QR: response
    q[6:8] = (2).to_bytes(2, "big")           # two answers
    cname = b"\xc0\x0c" + struct.pack("!HHIH", m.TYPE_CNAME, 1, 60, 2) + b"\xc0\x0c"
    a = b"\xc0\x0c" + struct.pack("!HHIH", m.TYPE_A, 1, 60, 4) + bytes((100, 64, 0, 2))
    return bytes(q) + cname + a


def seeds() -> dict[str, list[bytes]]:
    import base64
    from tsproxy.control import messages as m, wire as cw
    from tsproxy.derp import wire as dw
    from tsproxy.disco import stun
    ka, kb, wg_msgs, = T._wg_fixture()
    _, _, disco_inner, disco_sealed = T._disco_fixture()
    _, derp_frames = T._derp_fixture()
    _, _, request, server_bytes, records, _ = T._noise_fixture()
    pk = _packets()
    txid = bytes(range(12))
    b64 = lambda k: base64.b64encode(k).decode()  # noqa: E731
    return {
        "ip": pk,
        "netstack": [b"\x00" + _chunks(*pk), b"\x01" + _chunks(pk[0], pk[0], pk[2], pk[3], pk[6])],
        "wireguard": [_chunks(b"\x80"), _chunks(b"\x81"), _chunks(b"\x82"), _chunks(b"\x83"),
                      _chunks(b"\x80", b"\x83", b"\x83"), _chunks(b"\x00" + wg_msgs[0])],
        "disco": [b"\x00" + s for s in disco_sealed] + [bytes((0x80 + i,)) for i in range(4)],
        "stun": [b"\x00" + stun.build_request(txid), b"\x00" + stun.build_response(txid, "192.0.2.1", 3478),
                 b"\x80", b"\x81", b"\x82"],
        "derp": [b"\x00" + derp_frames, b"\x80", b"\x81",
                 b"\x01" + _chunks(derp_frames[:20], derp_frames[20:])],
        "noise": [b"\x81", b"\x82", b"\x83", b"\x00" + request, b"\x01" + server_bytes, b"\x02" + records],
        "control_wire": [b'{"publicKey":"mkey:' + b"07" * 32 + b'","legacyPublicKey":"mkey:' + b"00" * 32 + b'"}',
                         cw.UPGRADE_RESPONSE,
                         request, cw.build_early_payload(bytes(32))],
        "mapresponse": [json.dumps(_MAP).encode(), json.dumps([_MAP, _DELTA, {"KeepAlive": True}]).encode(),
                        m.encode_map_message(_MAP, compressed=False),
                        m.encode_map_message(_MAP) + m.encode_map_message({"KeepAlive": True})],
        "socks": [b"\x05\x02\x00\x02", b"\x05\x01\x00\x03\x0bexample.com\x00\x50",
                  b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50",
                  b"\x01\x04user\x04pass", b"\x04\x01\x00\x50\x00\x00\x00\x01user\x00host.test\x00",
                  b"\x00\x00\x00\x01\x0a\x00\x00\x01\x00\x35payload"],
        "http": [b"GET http://peer.tailnet.test:8080/x?y HTTP/1.1\r\nHost: peer\r\nConnection: keep-alive\r\n"
                 b"Proxy-Authorization: Basic dTpw\r\nContent-Length: 3\r\n\r\nabc",
                 b"CONNECT [fd7a:115c:a1e0::2]:443 HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                 b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"],
        "wgconf": [_WG_CONF.format(priv=b64(ka.raw), pub=b64(kb.public().raw), psk=b64(bytes(32))).encode()],
        "toml": [_TOML.encode()],
        "specs": [b"127.0.0.1:2222=peer.tailnet.test:22", b"udp:[::1]:53=[fd7a:115c:a1e0::2]:53",
                  b"8080=127.0.0.1:80", b":1055", b"[::1]:1080", b"41641"],
        "ipc": [b'{"op":"status"}\n', b'{"op":"nc","host":"peer","port":22}\n'],
        "dns": [_dns_response()],
    }


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    all_seeds = seeds()
    missing = set(T.TARGETS) - set(all_seeds)
    if missing:
        sys.exit(f"no seeds for {sorted(missing)}")
    for name, items in all_seeds.items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for i, data in enumerate(items):
            T.TARGETS[name](data)            # every seed must itself be handled cleanly
            with open(os.path.join(d, f"seed-{i:02d}"), "wb") as f:
                f.write(data)
    print(f"wrote {sum(map(len, all_seeds.values()))} seeds for {len(all_seeds)} targets under {root}")


if __name__ == "__main__":
    main()
