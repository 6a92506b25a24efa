"""The userspace IP stack: demux, listeners, ICMP, UDP sockets and one timer for everything.

    receive_packet(pkt, now)   IPv4/IPv6 in (already authenticated by WireGuard in the daemon)
    receive_packets(pkts, now) the same for one wakeup's batch: in-order data acked once per
                               connection at its end (ACK decimation)
    service_budget(now)        window updates for connections the shared receive budget
                               (tcp_budget.py) held back, after the applications read
    packets_to_send()          IP packets out
    next_deadline() / handle_timer(now)
                               one deadline for the whole stack: a heap of per-connection
                               deadlines, refreshed only for connections touched since, the
                               oldest TIME-WAIT record's expiry (tcp_timewait.py: a connection
                               entering TIME-WAIT is swapped for a small record, kept in
                               arrival order), and "now" while senders are parked by the send
                               quota (tcp_budget.py: new-data segments per flush of
                               packets_to_send are bounded)
    take_touched()             connections with events for the stream layer

Every malformed, unexpected or unroutable packet is dropped and counted, never raised.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import heapq
import ipaddress
import os
import struct

from tsproxy.errors import NetworkUnreachable
from tsproxy.netstack import tcp as T
from tsproxy.netstack.tcp_budget import (DEFAULT_BURST, DEFAULT_TOTAL as DEFAULT_RCV_BUDGET,
                                         ReceiveBudget, SendQuota)
from tsproxy.netstack.tcp_timewait import END as TIME_WAIT_END, REUSE_AFTER, TimeWait
from tsproxy.netstack.wire import icmp, ip, udp
from tsproxy.netstack.wire.checksum import checksum
from tsproxy.netstack.wire import tcp as W

EPHEMERAL_LO, EPHEMERAL_HI = 49152, 65535
DEFAULT_BACKLOG = 256
UDP_QUEUE_MAX = 1024
MAX_CONNECTIONS = 65536                    # live connections (TIME-WAIT records not counted)
MAX_TIME_WAIT = 65536                      # records beyond this end early, oldest first
_PORT = struct.Struct("!H")
_IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
_parse_ip = functools.lru_cache(maxsize=1024)(ipaddress.ip_address)   # the same few peers
RTT_CACHE_HOSTS = 1024                     # hosts whose last RTT seeds a new connection's SYN timer


class UdpSocket:
    """A bound UDP port.  Datagrams queue (bounded, oldest dropped) until read."""

    def __init__(self, stack: "Stack", port: int):
        self.stack = stack
        self.port = port
        self.queue: collections.deque = collections.deque()
        self.closed = False
        self.error: str | None = None
        self.notify = None                          # set by the stream layer

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        dst = ipaddress.ip_address(addr[0])
        src = self.stack.source_for(dst.version)
        self.stack.out.append(udp.build(src, dst.packed, self.port, addr[1], data))

    def recvfrom(self):
        return self.queue.popleft() if self.queue else None

    def _deliver(self, item) -> None:
        if len(self.queue) >= UDP_QUEUE_MAX:
            self.queue.popleft()
            self.stack.count("udp_queue_overflow")
        self.queue.append(item)
        if self.notify:
            self.notify(self, "readable")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stack.udp.pop(self.port, None)


class Stack:
    def __init__(self, addresses, *, mtu: int, now: float, rng=os.urandom,
                 verify_checksums: bool = True, msl: float = T.DEFAULT_MSL,
                 rcv_buf: int = T.DEFAULT_BUF, snd_buf: int = T.DEFAULT_BUF,
                 rcv_budget: int | None = DEFAULT_RCV_BUDGET,
                 tx_burst: int | None = DEFAULT_BURST):
        self.addresses = [ipaddress.ip_address(a) for a in addresses]
        self.addr_set = {a.packed for a in self.addresses}
        self.mtu = mtu
        self.rng = rng
        self.verify = verify_checksums
        self.msl = msl
        self.rcv_buf = rcv_buf
        self.snd_buf = snd_buf
        self._isn_secret = rng(16)
        # ephemeral ports go round from a random start: a 4-tuple comes back as late as
        # possible (after TIME_WAIT) and a connection costs no random draw
        self._next_port = int.from_bytes(rng(2), "big")
        self.out: list = []
        self.conns: dict = {}                       # (raddr, rport, laddr, lport) -> conn or TimeWait
        self.time_wait: collections.deque = collections.deque()   # TimeWait records, oldest first
        self.time_wait_held = 0                     # records still holding a 4-tuple (some in
                                                    # the deque have ended early)
        self.listeners: dict[int, int] = {}         # port -> backlog
        self.pending: collections.Counter = collections.Counter()   # port -> half-open count
        self.udp: dict[int, UdpSocket] = {}
        self.ports_in_use: collections.Counter = collections.Counter()
        self.touched: set = set()
        self._dirty: set = set()
        self._heap: list = []
        self._seq = 0
        self.counters: collections.Counter = collections.Counter()
        self.udp_errors: list = []
        # the sum of every connection's receive window (tcp_budget.py); None: unbounded
        self.budget = ReceiveBudget(rcv_budget) if rcv_budget else None
        self._ack_due: set = set()                  # connections owing an ACK at batch end
        self.rtt_cache: dict = {}                   # remote address -> (srtt, rttvar) of its last connection
        # new-data segments per flush of the outbox, all connections together; None: unbounded
        self.tx_gate = SendQuota(tx_burst) if tx_burst else None

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def packets_to_send(self) -> list:
        out = self.out[:]          # connections hold a reference to this very list
        self.out.clear()
        if self.tx_gate is not None:
            self.tx_gate.refill()  # the next flush may carry another burst
        return out

    def source_for(self, version: int) -> bytes:
        for a in self.addresses:
            if a.version == version:
                return a.packed
        raise NetworkUnreachable(f"no IPv{version} address on the tunnel")

    # ---------------------------------------------------------------- TCP open
    def _isn(self, key, now: float) -> int:
        raddr, rport, laddr, lport = key       # RFC 6528: clock + keyed hash of the 4-tuple
        h = hashlib.blake2s(raddr + _PORT.pack(rport) + laddr + _PORT.pack(lport),
                            key=self._isn_secret, digest_size=4).digest()
        return (int(now * 250000) + int.from_bytes(h, "big")) & T.M32

    def _mss(self, version: int) -> int:
        return self.mtu - (40 if version == 4 else 60)

    def _new_conn(self, key, now: float, iss: int | None = None, **kw) -> T.TcpConnection:
        raddr, rport, laddr, lport = key
        pk = W.Packetizer(laddr, raddr, lport, rport)
        if iss is None:
            iss = self._isn(key, now)
        conn = T.TcpConnection(self.out, pk, now=now, iss=iss,
                               mss=self._mss(4 if len(laddr) == 4 else 6), notify=self._on_event,
                               counters=self.counters, rcv_cap=self.rcv_buf, snd_cap=self.snd_buf,
                               msl=self.msl, **kw)
        conn.key = key
        conn.passive = False
        conn.ack_defer = self._ack_due
        conn.tx_gate = self.tx_gate
        if self.budget is not None:
            conn.budget = self.budget
            self.budget.attach(conn)
        self.conns[key] = conn
        self.ports_in_use[(laddr, lport)] += 1
        return conn

    def tcp_connect(self, dst_ip, dst_port: int, now: float, *, timeout: float | None = None,
                    **kw) -> T.TcpConnection:
        """Active open; with `timeout`, a connection not established by then ends with
        error "dial_timeout" (on the stack's one timer, no timer of its own)."""
        dst = dst_ip if dst_ip.__class__ in _IP_TYPES else _parse_ip(dst_ip)
        if not 0 < dst_port < 65536:
            raise ValueError("port out of range")
        laddr = self.source_for(dst.version)
        if len(self.conns) - self.time_wait_held >= MAX_CONNECTIONS:
            raise NetworkUnreachable("too many connections")
        lport, old = self._ephemeral(laddr, dst.packed, dst_port, now)
        key = (dst.packed, dst_port, laddr, lport)
        iss = None
        if old is not None:                      # the 4-tuple's TIME-WAIT record, taken over
            iss = old.reuse_iss(self._isn(key, now))
            self._end_time_wait(old)
            self.counters["tcp_time_wait_reused"] += 1
        conn = self._new_conn(key, now, iss, **kw)
        if timeout is not None:
            conn.connect_by = now + timeout
        rtt = self.rtt_cache.get(dst.packed)
        if rtt is not None:
            # this host's RTT is known from earlier connections (RFC 6298 2.1 asks for 1 s only
            # until one is measured): a lost SYN or SYN-ACK costs ~RTO, not a full second
            conn.rto = min(max(rtt[0] + 4 * rtt[1], T.RTO_MIN), T.RTO_INITIAL)
        conn.connect(now)
        self._dirty.add(conn)
        return conn

    def _ephemeral(self, laddr: bytes, raddr: bytes, rport: int, now: float):
        """(port, None) for a free 4-tuple, or (port, record) for one whose TIME-WAIT record
        may be taken over (tcp_timewait.py).  Ports go round, so the next candidate is the one
        used longest ago: past ~16k connections to one server within 2*MSL it is a record old
        enough to reuse, found at once instead of after a scan of all the others."""
        span = EPHEMERAL_HI - EPHEMERAL_LO + 1
        start = self._next_port
        conns = self.conns
        for i in range(span):
            port = EPHEMERAL_LO + (start + i) % span
            if port in self.udp or port in self.listeners:
                continue
            held = conns.get((raddr, rport, laddr, port))
            if held is None or (held.__class__ is TimeWait and now - held.since >= REUSE_AFTER):
                self._next_port = (start + i + 1) % span
                return port, held
        raise NetworkUnreachable("no free local port")

    def tcp_listen(self, port: int, backlog: int = DEFAULT_BACKLOG) -> None:
        self.listeners[port] = backlog

    def tcp_unlisten(self, port: int) -> None:
        self.listeners.pop(port, None)

    def udp_bind(self, port: int = 0) -> UdpSocket:
        if port == 0:
            span = EPHEMERAL_HI - EPHEMERAL_LO + 1
            start = int.from_bytes(self.rng(2), "big") % span
            for i in range(span):
                cand = EPHEMERAL_LO + (start + i) % span
                if cand not in self.udp:
                    port = cand
                    break
            else:
                raise NetworkUnreachable("no free UDP port")
        elif port in self.udp:
            raise OSError(f"UDP port {port} already bound on the tunnel")
        sock = UdpSocket(self, port)
        self.udp[port] = sock
        return sock

    # ---------------------------------------------------------------- events and timers
    def _on_event(self, conn) -> None:
        self.touched.add(conn)

    def take_touched(self) -> set:
        t, self.touched = self.touched, set()
        return t

    def poke(self, conn) -> None:
        """The stream layer changed a connection (send/recv/close): refresh its timer."""
        self._dirty.add(conn)
        if conn.state == T.CLOSED:
            self._remove(conn)
        elif conn.state == T.TIME_WAIT:
            self._to_time_wait(conn)

    def _remove(self, conn) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
            self._remember_rtt(conn)
            self.ports_in_use[(conn.key[2], conn.key[3])] -= 1
            if getattr(conn, "half_open", False):
                self.pending[conn.key[3]] -= 1
                conn.half_open = False

    def live_connections(self) -> list:
        """The connections (TIME-WAIT records left out: they are only a 4-tuple on hold)."""
        return [c for c in self.conns.values() if c.__class__ is not TimeWait]

    def _remember_rtt(self, conn) -> None:
        if conn.srtt is not None:                # remembered for the next SYN to this host
            cache = self.rtt_cache
            cache.pop(conn.key[0], None)
            if len(cache) >= RTT_CACHE_HOSTS:
                del cache[next(iter(cache))]     # the least recently updated host
            cache[conn.key[0]] = (conn.srtt, conn.rttvar)

    def _to_time_wait(self, conn) -> None:
        """Swap a connection that entered TIME-WAIT for its record; the connection object
        is done with (the stream layer had EV_CLOSED) and keeps no deadline."""
        if self.conns.get(conn.key) is not conn:
            return
        tw_at = conn.time_wait_at
        rec = TimeWait.of(conn, tw_at - 2 * conn.msl if tw_at is not None else 0.0)
        conn.time_wait_at = conn.delack_at = conn.wnd_nudge_at = None
        conn._sched = None                        # its heap entry is stale now
        self.conns[conn.key] = rec
        self._remember_rtt(conn)
        tw = self.time_wait
        tw.append(rec)
        self.time_wait_held += 1
        while self.time_wait_held > MAX_TIME_WAIT:      # the oldest live record ends early
            old = tw.popleft()
            if not old.done:
                self.counters["tcp_time_wait_overflow"] += 1
                self._end_time_wait(old)

    def _end_time_wait(self, rec: TimeWait) -> None:
        """The record ends (expired, RST, taken over, overflow); the FIFO drops it lazily."""
        if rec.done:
            return
        rec.done = True
        self.time_wait_held -= 1
        if self.conns.get(rec.key) is rec:
            del self.conns[rec.key]
            self.ports_in_use[(rec.key[2], rec.key[3])] -= 1

    def _expire_time_wait(self, now: float) -> None:
        tw = self.time_wait
        while tw and (tw[0].done or tw[0].expires <= now):
            self._end_time_wait(tw.popleft())

    def next_deadline(self) -> float | None:
        heap = self._heap
        for conn in self._dirty:
            d = conn.next_deadline()
            if d is not None and d != getattr(conn, "_sched", None):
                conn._sched = d
                self._seq += 1
                heapq.heappush(heap, (d, self._seq, conn))
            elif d is None:
                conn._sched = None
        self._dirty.clear()
        while heap and heap[0][2]._sched != heap[0][0]:
            heapq.heappop(heap)                      # stale entry
        if len(heap) > 4 * (len(self.conns) - self.time_wait_held) + 64:
            self._heap = heap = [e for e in heap if e[2]._sched == e[0]]
            heapq.heapify(heap)
        d = heap[0][0] if heap else None
        tw = self.time_wait
        while tw and tw[0].done:
            tw.popleft()
        if tw and (d is None or tw[0].expires < d):
            d = tw[0].expires
        gate = self.tx_gate
        if gate is not None and gate.since is not None and (d is None or gate.since < d):
            d = gate.since                           # parked senders: due now
        return d

    def handle_timer(self, now: float) -> None:
        gate = self.tx_gate
        if gate is not None and gate.since is not None:
            for conn in gate.take_parked():          # oldest first: round-robin
                if conn.state != T.CLOSED:
                    conn._output(now)
                    self._after(conn)
        self._expire_time_wait(now)
        self.next_deadline()
        heap = self._heap
        while heap and heap[0][0] <= now:
            d, _, conn = heapq.heappop(heap)
            if conn._sched != d:
                continue
            conn._sched = None
            conn.handle_timer(now)
            self._after(conn)

    def _after(self, conn) -> None:
        self._dirty.add(conn)
        if conn.state == T.CLOSED:
            self._remove(conn)
        elif conn.state == T.TIME_WAIT:
            self._to_time_wait(conn)
        elif getattr(conn, "half_open", False) and conn.state != T.SYN_RECEIVED:
            conn.half_open = False
            self.pending[conn.key[3]] -= 1

    # ---------------------------------------------------------------- input
    def receive_packets(self, pkts, now: float) -> None:
        """A batch of inbound packets (one wakeup's worth): in-order data is acked once per
        connection at the end of the batch instead of every second segment."""
        rx = self._receive
        for pkt in pkts:
            rx(pkt, now)
        self._end_batch(now)

    def receive_packet(self, pkt, now: float) -> None:
        self._receive(pkt, now)
        self._end_batch(now)

    def _end_batch(self, now: float) -> None:
        due = self._ack_due
        if due:
            for conn in list(due):
                conn.flush_ack(now)
                self._after(conn)
            due.clear()
        self.service_budget(now)

    def service_budget(self, now: float) -> None:
        """Window updates for connections the receive budget held back, now that the
        applications have read (round-robin, oldest waiter first)."""
        b = self.budget
        if b is not None and b._waiters:
            for conn in b.take_ready():
                conn.budget_wakeup(now)
                self._after(conn)

    def _receive(self, pkt, now: float) -> None:
        r = ip.parse(pkt, self.verify)
        if r.__class__ is str:
            self.counters[r] += 1
            return
        v, src, dst, proto, start, end = r
        if dst not in self.addr_set:
            self.counters["ip_not_for_us"] += 1
            return
        if proto == 6:
            self._rx_tcp(pkt, v, src, dst, start, end, now)
        elif proto == 17:
            self._rx_udp(pkt, v, src, dst, start, end)
        elif (proto == 1 and v == 4) or (proto == 58 and v == 6):
            self._rx_icmp(pkt, v, src, dst, start, end)
        elif proto == 99:          # TSMP (peers' disco-key advertisements, pings): not used
            self.counters["tsmp_dropped"] += 1
        else:
            self.counters["ip_unknown_protocol"] += 1

    def _rx_tcp(self, pkt, v, src, dst, start, end, now) -> None:
        if end - start < 20:
            self.counters["tcp_bad_header"] += 1
            return
        sport, dport, seq, ack, offflags, window, _, _ = W.unpack_header(pkt, start)
        hl = (offflags >> 12) * 4
        if hl < 20 or start + hl > end:
            self.counters["tcp_bad_header"] += 1
            return
        if self.verify and not W.segment_checksum_ok(pkt, start, end, src, dst, ip.PROTO_TCP):
            self.counters["tcp_bad_checksum"] += 1
            return
        flags = offflags & 0x1FF
        options = bytes(pkt[start + 20:start + hl]) if hl > 20 else b""
        payload = memoryview(pkt)[start + hl:end]
        key = (src, sport, dst, dport)
        conn = self.conns.get(key)
        if conn is not None:
            if conn.__class__ is TimeWait:
                self._rx_time_wait(conn, seq, flags, end - start - hl)
                return
            conn.receive_segment(seq, ack, flags, window, options, payload, now)
            self._after(conn)
            return
        if flags & W.RST:
            return
        if flags & W.SYN and not flags & W.ACK and dport in self.listeners:
            if self.pending[dport] >= self.listeners[dport] or len(self.conns) >= MAX_CONNECTIONS:
                self.counters["tcp_backlog_drop"] += 1
                return
            conn = self._new_conn((src, sport, dst, dport), now)
            conn.passive = True
            conn.half_open = True
            self.pending[dport] += 1
            conn.accept_syn(seq, window, options, now)
            self._dirty.add(conn)
            return
        # nobody here: RST (RFC 9293 3.10.7.1)
        self.counters["tcp_rst_closed_port"] += 1
        pk = W.Packetizer(dst, src, dport, sport)
        if flags & W.ACK:
            self.out.append(pk.build(ack, 0, W.RST, 0))
        else:
            seg_len = end - start - hl + (1 if flags & W.SYN else 0) + (1 if flags & W.FIN else 0)
            self.out.append(pk.build(0, seq + seg_len, W.RST | W.ACK, 0))

    def _rx_time_wait(self, rec: TimeWait, seq: int, flags: int, plen: int) -> None:
        answer = rec.segment(seq, flags, plen)
        if answer is None:
            return
        if answer is TIME_WAIT_END:
            self._end_time_wait(rec)
            return
        self.counters["tcp_time_wait_acks"] += 1
        self.out.append(answer)

    def _rx_udp(self, pkt, v, src, dst, start, end) -> None:
        if end - start < 8:
            self.counters["udp_bad_header"] += 1
            return
        sport, dport, length, csum = udp.unpack_header(pkt, start)
        if length < 8 or start + length > end:
            self.counters["udp_bad_header"] += 1
            return
        if self.verify and (csum or v == 6) and not W.segment_checksum_ok(pkt, start, start + length, src, dst, ip.PROTO_UDP):
            self.counters["udp_bad_checksum"] += 1
            return
        sock = self.udp.get(dport)
        if sock is None:
            self.counters["udp_no_socket"] += 1
            self.out.append(icmp.port_unreachable(v, dst, src, bytes(pkt[:end])))
            return
        sock._deliver((bytes(pkt[start + 8:start + length]), (str(ipaddress.ip_address(src)), sport)))

    def _rx_icmp(self, pkt, v, src, dst, start, end) -> None:
        if end - start < 8:
            self.counters["icmp_bad_header"] += 1
            return
        body = bytes(pkt[start:end])
        t, code = body[0], body[1]
        if self.verify:
            ok = (checksum(body) == 0 if v == 4
                  else W.segment_checksum_ok(pkt, start, end, src, dst, ip.PROTO_ICMPV6))
            if not ok:
                self.counters["icmp_bad_checksum"] += 1
                return
        if v == 4:
            if t == icmp.V4_ECHO_REQUEST:
                self.counters["icmp_echo_replied"] += 1
                self.out.append(icmp.echo_reply(4, dst, src, body))
                return
            kind = icmp.classify_v4(t, code)
        else:
            if t == icmp.V6_ECHO_REQUEST:
                self.counters["icmp_echo_replied"] += 1
                self.out.append(icmp.echo_reply(6, dst, src, body))
                return
            kind = icmp.classify_v6(t, code)
        if kind is None:
            self.counters["icmp_ignored"] += 1
            return
        self._icmp_error(kind, body[8:])

    def _icmp_error(self, kind: str, quoted: bytes) -> None:
        """Find the connection the quoted packet belongs to and tell it."""
        if len(quoted) < 20:
            self.counters["icmp_bad_quote"] += 1
            return
        qv = quoted[0] >> 4
        if qv == 4:
            ihl = (quoted[0] & 15) * 4
            proto, qsrc, qdst = quoted[9], quoted[12:16], quoted[16:20]
            off = ihl
        elif qv == 6 and len(quoted) >= 40:
            proto, qsrc, qdst = quoted[6], quoted[8:24], quoted[24:40]
            off = 40
        else:
            self.counters["icmp_bad_quote"] += 1
            return
        if len(quoted) < off + 4:
            self.counters["icmp_bad_quote"] += 1
            return
        sport = int.from_bytes(quoted[off:off + 2], "big")
        dport = int.from_bytes(quoted[off + 2:off + 4], "big")
        if proto == 6:
            conn = self.conns.get((qdst, dport, qsrc, sport))
            if conn is not None and conn.__class__ is not TimeWait:
                conn.icmp_error(kind, 0.0)
                self.counters["icmp_error_delivered"] += 1
                self._after(conn)
                return
        elif proto == 17:
            sock = self.udp.get(sport)
            if sock is not None:
                sock.error = kind
                if sock.notify:
                    sock.notify(sock, "error")
                self.counters["icmp_error_delivered"] += 1
                return
        self.counters["icmp_error_unmatched"] += 1
