"""The packet pipeline of both modes, built in one place.

Pipeline order, from the tunnel up and back (the same in WireGuard mode and on a tailnet):

    bind receive (UdpBind: UDP socket, GRO | MagicConn: UDP + DERP, disco/STUN taken out)
      -> DeviceLoop.receive: WgDevice.receive_datagrams (decrypt per datagram; session lookup
         and peer bookkeeping once per run of one session's datagrams; roaming)
      -> Pipeline.from_tunnel: inbound packet filter (new flows only), then
      -> NetstackRuntime.deliver (TCP/UDP/ICMP in our stack, up to the Dialer's streams)

    NetstackRuntime send_packets (one batch per loop turn)
      -> Pipeline.to_tunnel: the filter notes our outbound UDP flows (their replies pass)
      -> DeviceLoop.send_packets: WgDevice.send_packets (route by AllowedIPs and check the
         session once per run of packets to one peer, encrypt each)
      -> bind send (UdpBind: GSO runs | MagicConn: direct UDP, DERP, or both while discovering)

    one DeadlineTimer on min(WgDevice.next_deadline(), bind.next_deadline())

The filter slot exists in both modes: the tailnet's packet filter (netstack/inbound_filter.py,
set from each netmap) or, in WireGuard mode, none (allow all, no per-packet cost) unless one is
passed in.
"""

from __future__ import annotations

class Pipeline:
    """Glue between the netstack and the device loop, with the inbound filter in between."""

    def __init__(self, packet_filter=None):
        self.filter = packet_filter
        self.netstack = None
        self.link = None           # WgUdpTransport or MagicConn: has send_packets(list)

    def attach(self, netstack, link) -> None:
        self.netstack, self.link = netstack, link

    # looked up per batch (not bound once), so a tap on netstack.deliver or a swapped filter
    # takes effect; per batch, not per packet, so it costs nothing measurable
    def up(self, packets: list) -> None:
        """Decrypted packets from the device loop -> filter -> netstack."""
        f = self.filter
        self.netstack.deliver(packets if f is None else f.filter(packets))

    def down(self, packets: list) -> None:
        """Packets from the netstack -> filter notes outbound flows -> device loop."""
        f = self.filter
        if f is not None:
            f.note_outbound(packets)
        self.link.send_packets(packets)


async def build_wireguard(device, stack, *, port: int = 0, host: str | None = None,
                          packet_filter=None):
    """WireGuard mode: -> (pipeline, WgUdpTransport, NetstackRuntime).  OSError if the UDP
    port cannot be bound."""
    from tsproxy.netstack.aio import NetstackRuntime
    from tsproxy.wg.aio import WgUdpTransport

    pipe = Pipeline(packet_filter)
    udp = await WgUdpTransport.create(device, port=port, host=host, on_packets=pipe.up)
    netstack = NetstackRuntime(stack, send_packets=pipe.down)
    pipe.attach(netstack, udp)
    return pipe, udp, netstack


async def build_tailnet(device, stack, *, packet_filter, node_private, disco_private,
                        port: int = 0, on_endpoints=None, on_home_derp=None, trust=None):
    """Tailnet mode: -> (pipeline, MagicConn, NetstackRuntime).  OSError if the UDP port
    cannot be bound."""
    from tsproxy.magicsock.aio import MagicConn
    from tsproxy.netstack.aio import NetstackRuntime

    pipe = Pipeline(packet_filter)
    magic = await MagicConn.create(device, node_private=node_private,
                                   disco_private=disco_private, port=port, on_packets=pipe.up,
                                   on_endpoints=on_endpoints, on_home_derp=on_home_derp,
                                   trust=trust)
    netstack = NetstackRuntime(stack, send_packets=pipe.down)
    pipe.attach(netstack, magic)
    return pipe, magic, netstack
