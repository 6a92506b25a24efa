"""Two sans-IO stacks with one TCP connection established between them, packets moved by hand
(the unit tests of the netstack's ACK, window and recovery behaviour share it)."""

from tsproxy.netstack import tcp as T
from tsproxy.netstack.stack import Stack

A, B = "10.0.0.1", "10.0.0.2"


def established_pair(a_kw: dict, b_kw: dict):
    """a connected to b's port 80; returns (a, b, ca, cb) with nothing in flight."""
    a = Stack([A], mtu=1420, now=0.0, **a_kw)
    b = Stack([B], mtu=1420, now=0.0, **b_kw)
    b.tcp_listen(80)
    ca = a.tcp_connect(B, 80, 0.0)
    for _ in range(4):
        for p in a.packets_to_send():
            b.receive_packet(p, 0.0)
        for p in b.packets_to_send():
            a.receive_packet(p, 0.0)
    cb = next(c for c in b.conns.values() if c.passive)
    a.take_touched()
    b.take_touched()
    assert ca.state == cb.state == T.ESTABLISHED
    return a, b, ca, cb
