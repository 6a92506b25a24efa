"""WireGuard data-path micro benchmark: 1420-byte IPv4 packets encrypted by one WgDevice and
decrypted by another, in memory (no sockets).  Prints packets/s and MB/s; no assertions.

    .venv/bin/python bench/bench_wg_micro.py [--packets N] [--batch B]
"""

import argparse
import ipaddress
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsproxy.keys import NodePrivate  # noqa: E402
from tsproxy.wg.device import WgDevice  # noqa: E402

A_IP, B_IP = "10.0.0.1", "10.0.0.2"
A_ADDR, B_ADDR = ("192.0.2.1", 51820), ("192.0.2.2", 51820)
SIZE = 1420


def make_pair():
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    a = WgDevice(ka, now=0.0)
    b = WgDevice(kb, now=0.0)
    a.add_peer(kb.public(), allowed_ips=[ipaddress.ip_network(B_IP + "/32")], endpoint=B_ADDR)
    b.add_peer(ka.public(), allowed_ips=[ipaddress.ip_network(A_IP + "/32")], endpoint=A_ADDR)
    return a, b


def packet(n: int) -> bytes:
    payload = bytes(SIZE - 28)
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, SIZE, n & 0xFFFF, 0, 64, 17, 0,
                       ipaddress.ip_address(A_IP).packed, ipaddress.ip_address(B_IP).packed) \
        + struct.pack(">HHHH", 1000, 2000, SIZE - 20, 0) + payload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    a, b = make_pair()
    now = 1.0
    # handshake
    a.send_packet(packet(0), now)
    for _ in range(4):
        for d, _ep in a.datagrams_to_send():
            b.receive_datagram(d, A_ADDR, now)
        for d, _ep in b.datagrams_to_send():
            a.receive_datagram(d, B_ADDR, now)
    b.take_packets()
    pkts = [packet(i) for i in range(args.batch)]

    enc_time = dec_time = 0.0
    sent = received = 0
    datagram_bytes = 0
    while sent < args.packets:
        t0 = time.perf_counter()
        for p in pkts:
            a.send_packet(p, now)
        out = a.datagrams_to_send()
        t1 = time.perf_counter()
        for d, _ep in out:
            b.receive_datagram(d, A_ADDR, now)
        got = b.take_packets()
        t2 = time.perf_counter()
        enc_time += t1 - t0
        dec_time += t2 - t1
        sent += len(pkts)
        received += len(got)
        datagram_bytes += sum(len(d) for d, _ in out)
    total = enc_time + dec_time
    mb = sent * SIZE / 1e6
    print(f"packets: {sent} sent, {received} delivered, {SIZE}-byte IP packets, "
          f"{datagram_bytes // max(sent, 1)} bytes per datagram")
    print(f"encrypt: {sent / enc_time:,.0f} pkt/s  {mb / enc_time:,.1f} MB/s")
    print(f"decrypt: {received / dec_time:,.0f} pkt/s  {received * SIZE / 1e6 / dec_time:,.1f} MB/s")
    print(f"both   : {sent / total:,.0f} pkt/s  {mb / total:,.1f} MB/s (one core, encrypt+decrypt)")
    print(f"sender counters: {dict((k, v) for k, v in a.counters.items() if v)}")
    print(f"receiver counters: {dict((k, v) for k, v in b.counters.items() if v)}")


if __name__ == "__main__":
    main()
