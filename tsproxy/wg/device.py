"""A sans-IO WireGuard device: several peers, an index table, AllowedIPs routing, timers.

    send_packet(ip_packet, now)          -> encrypt for the peer AllowedIPs routes it to
    send_packets(ip_packets, now)        -> the same for a batch
    receive_datagram(data, addr, now)    -> handshakes, cookies, transport data
    receive_datagrams([(data, addr)], now) -> the same for a batch (one wakeup's reads)
    take_packets()                       -> decrypted inbound IP packets
    datagrams_to_send()                  -> [(datagram, endpoint)]
    next_deadline() / handle_timer(now)  -> every peer timer folded into one deadline

Endpoints are opaque hashables ((ip, port) in plain WireGuard mode).  TAI64N needs wall time,
which the core does not read: `wall_offset` maps the device clock to Unix time.
Bad input never raises: it is dropped and counted in `counters`.
"""

from __future__ import annotations

import ipaddress
import os
import struct

from cryptography.exceptions import InvalidTag

from tsproxy.keys import NodePrivate, NodePublic
from tsproxy.noise import ikpsk2
from tsproxy.noise.primitives import dh
from tsproxy.wg.allowedips import AllowedIPs
from tsproxy.wg.constants import (COOKIE_REFRESH_TIME, HANDSHAKE_INITIATION_RATE,
                                  KEEPALIVE_TIMEOUT, MAX_TIMER_HANDSHAKES, REJECT_AFTER_MESSAGES,
                                  REJECT_AFTER_TIME, REKEY_ON_RECEIVE_AGE, REKEY_TIMEOUT,
                                  REKEY_TIMEOUT_JITTER_MAX, UNDER_LOAD_HANDSHAKES_PER_SECOND,
                                  ZERO_KEYS_AFTER)
from tsproxy.wg.peer import Keypair, Peer

_DATA_HDR = struct.Struct("<IIQ")        # type word, receiver index, counter
_pack_data_hdr = _DATA_HDR.pack
_pack_data_hdr_into = _DATA_HDR.pack_into
_unpack_data_hdr = _DATA_HDR.unpack_from
_NONCE = struct.Struct("<4xQ").pack
_U16 = struct.Struct(">H").unpack_from
_ZERO_PAD = bytes(16)
_KEEPALIVE = b""

COUNTER_NAMES = (
    "rx_datagrams", "rx_data", "rx_keepalive", "rx_short", "rx_bad_type", "rx_unknown_index",
    "rx_replay", "rx_decrypt_failed", "rx_expired_keypair", "rx_bad_inner", "rx_src_not_allowed",
    "rx_initiation", "rx_response", "rx_cookie", "mac1_invalid", "mac2_invalid",
    "handshake_unknown_peer", "handshake_decrypt_failed", "handshake_replayed_timestamp",
    "handshake_flood", "cookie_sent", "cookie_invalid", "response_unexpected",
    "tx_data", "tx_keepalive", "tx_no_route", "tx_no_endpoint", "tx_staged", "tx_staged_dropped",
    "handshake_initiated", "handshake_completed", "handshake_gave_up", "keypairs_zeroed",
)


class WgDevice:
    def __init__(self, private_key: NodePrivate, *, now: float, rng=os.urandom,
                 wall_offset: float = 0.0, mtu: int = 1420,
                 under_load_threshold: int = UNDER_LOAD_HANDSHAKES_PER_SECOND):
        self.private_key = private_key
        self._priv = private_key.raw
        self.public = private_key.public()
        self._pub = self.public.raw
        self.rng = rng
        self.wall_offset = wall_offset
        self.mtu = mtu
        self.under_load_threshold = under_load_threshold
        self.force_under_load = False              # tests and operators can demand cookies
        self._our_mac1_key = ikpsk2.mac1_key(self._pub)
        self._our_cookie_key = ikpsk2.cookie_key(self._pub)
        self._cookie_secret = rng(32)
        self._cookie_secret_at = now
        self._load_window_start = now
        self._load_count = 0

        self.peers: dict[NodePublic, Peer] = {}
        self._by_static: dict[bytes, Peer] = {}
        self._index: dict[int, tuple[Peer, Keypair | None]] = {}   # local index -> owner
        self.allowed = AllowedIPs()
        self._inbound: list[bytes] = []
        self._outbound: list[tuple[bytes, object]] = []
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)

    # -- configuration --------------------------------------------------------------------
    def add_peer(self, public: NodePublic, *, allowed_ips=(), endpoint=None,
                 preshared_key: bytes | None = None, persistent_keepalive: float = 0.0) -> None:
        if public in self.peers:
            raise ValueError(f"peer {public.short()} already configured")
        try:
            ss = dh(self._priv, public.raw)
        except ValueError:
            raise ValueError(f"peer {public.short()} has a low-order public key") from None
        peer = Peer(public, static_pub=public.raw, precomputed_ss=ss,
                    psk=preshared_key or bytes(32), mac1_key=ikpsk2.mac1_key(public.raw),
                    cookie_key=ikpsk2.cookie_key(public.raw), endpoint=endpoint,
                    persistent_keepalive=persistent_keepalive)
        if persistent_keepalive:
            peer.persistent_at = 0.0            # fires at the first timer: bring the tunnel up now
        self.peers[public] = peer
        self._by_static[public.raw] = peer
        for net in allowed_ips:
            self.allowed.insert(net, peer)

    def set_private_key(self, private_key: NodePrivate) -> None:
        """A new static key (Tailscale node-key rotation): every session and handshake in
        flight was made with the old key, so they are dropped and renegotiated on demand."""
        self.private_key = private_key
        self._priv = private_key.raw
        self.public = private_key.public()
        self._pub = self.public.raw
        self._our_mac1_key = ikpsk2.mac1_key(self._pub)
        self._our_cookie_key = ikpsk2.cookie_key(self._pub)
        for peer in self.peers.values():
            peer.precomputed_ss = dh(self._priv, peer.static_pub)
            self._forget(peer.clear_keypairs())
            if peer.handshake_index is not None:
                self._index.pop(peer.handshake_index, None)
                peer.handshake_index = None
            peer.handshake = None
            peer.last_initiation_sent = -1e18      # the new key may initiate at once

    def update_peer(self, public: NodePublic, *, allowed_ips=None, endpoint=None,
                    preshared_key: bytes | None = None, persistent_keepalive: float | None = None) -> None:
        peer = self.peers[public]
        if allowed_ips is not None:
            self.allowed.remove_value(peer)
            for net in allowed_ips:
                self.allowed.insert(net, peer)
        if endpoint is not None:
            peer.endpoint = endpoint
        if preshared_key is not None:
            peer.psk = preshared_key
        if persistent_keepalive is not None:
            peer.persistent_keepalive = persistent_keepalive
            peer.persistent_at = 0.0 if persistent_keepalive else None

    def remove_peer(self, public: NodePublic) -> None:
        peer = self.peers.pop(public, None)
        if peer is None:
            return
        self._by_static.pop(public.raw, None)
        self.allowed.remove_value(peer)
        self._forget(peer.clear_keypairs())
        if peer.handshake_index is not None:
            self._index.pop(peer.handshake_index, None)

    # -- outputs --------------------------------------------------------------------------
    def take_packets(self) -> list[bytes]:
        out, self._inbound = self._inbound, []
        return out

    def datagrams_to_send(self) -> list[tuple[bytes, object]]:
        out, self._outbound = self._outbound, []
        return out

    # -- sending --------------------------------------------------------------------------
    def send_packet(self, packet: bytes, now: float) -> bool:
        if len(packet) < 20:
            self.counters["tx_no_route"] += 1
            return False
        v = packet[0] >> 4
        if v == 4:
            peer = self.allowed.lookup_packed(bytes(packet[16:20]))
        elif v == 6 and len(packet) >= 40:
            peer = self.allowed.lookup_packed(bytes(packet[24:40]))
        else:
            peer = None
        if peer is None:
            self.counters["tx_no_route"] += 1
            return False
        kp = peer.current
        if kp is not None and now - kp.created < REJECT_AFTER_TIME and kp.send_counter < REJECT_AFTER_MESSAGES:
            self._encrypt(peer, kp, packet, now)
            if peer.wants_rekey_on_send(kp, now):
                self._initiate(peer, now)
            return True
        if peer.stage(packet):
            self.counters["tx_staged"] += 1
        else:                                        # oldest staged packet made room
            self.counters["tx_staged_dropped"] += 1
        self._initiate(peer, now)
        return True

    def send_packets(self, packets, now: float) -> None:
        """A batch of IP packets (one wakeup's output of the netstack): the same as
        send_packet for each, but a run of packets to one peer with a usable session pays the
        route lookup, the session checks and the peer bookkeeping once per run."""
        i, n = 0, len(packets)
        send = self.send_packet
        lookup = self.allowed.lookup_packed
        while i < n:
            p = packets[i]
            i += 1
            if len(p) < 40 or p[0] >> 4 != 4:           # IPv6, short, odd: the one-by-one path
                send(p, now)
                continue
            dst = bytes(p[16:20])
            peer = lookup(dst)
            kp = peer.current if peer is not None else None
            if (kp is None or peer.endpoint is None or now - kp.created >= REJECT_AFTER_TIME
                    or kp.send_counter >= REJECT_AFTER_MESSAGES):
                send(p, now)
                continue
            j = i
            while j < n and len(q := packets[j]) >= 40 and q[0] == p[0] and q[16:20] == dst:
                j += 1
            self._encrypt_run(peer, kp, packets, i - 1, j, now)
            i = j
            if peer.wants_rekey_on_send(kp, now):
                self._initiate(peer, now)

    def _encrypt_run(self, peer: Peer, kp: Keypair, packets, i: int, j: int, now: float) -> None:
        """_encrypt for packets[i:j], all to `peer` under `kp`, the bookkeeping done once."""
        mtu = self.mtu
        counter = kp.send_counter
        stop = min(j, i + REJECT_AFTER_MESSAGES - counter)   # the rest waits for a new session
        remote = kp.remote_index
        encrypt_into = kp.send.encrypt_into
        ep = peer.endpoint
        append = self._outbound.append
        sent = 0
        for k in range(i, stop):
            packet = packets[k]
            n = len(packet)
            pad = -n & 15
            if pad and n + pad > mtu:
                pad = max(mtu - n, 0)
            if pad:
                packet = packet + _ZERO_PAD[:pad]
                n += pad
            out = bytearray(32 + n)
            _pack_data_hdr_into(out, 0, 4, remote, counter)
            encrypt_into(_NONCE(counter), packet, None, memoryview(out)[16:])
            append((out, ep))
            counter += 1
            sent += n + 32
        count = stop - i
        kp.send_counter = counter
        peer.tx_bytes += sent
        peer.tx_packets += count
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        self.counters["tx_data"] += count
        if peer.new_handshake_at is None:
            peer.on_data_sent(now)
        for k in range(stop, j):                           # past the message limit: stage
            self.send_packet(packets[k], now)

    def _encrypt(self, peer: Peer, kp: Keypair, packet: bytes, now: float) -> None:
        if peer.endpoint is None:
            self.counters["tx_no_endpoint"] += 1
            return
        counter = kp.send_counter
        kp.send_counter = counter + 1
        n = len(packet)
        pad = -n & 15
        if pad and n + pad > self.mtu:
            pad = max(self.mtu - n, 0)
        if pad:
            packet = packet + _ZERO_PAD[:pad]
            n += pad
        # header and ciphertext written into one buffer: no concatenation copy per packet
        out = bytearray(16 + n + 16)
        _pack_data_hdr_into(out, 0, 4, kp.remote_index, counter)
        kp.send.encrypt_into(_NONCE(counter), packet, None, memoryview(out)[16:])
        self._outbound.append((out, peer.endpoint))
        peer.tx_bytes += n + 32
        peer.tx_packets += 1
        peer.keepalive_at = None                     # peer.on_any_sent, inlined (hot path)
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        if n:
            self.counters["tx_data"] += 1
            if peer.new_handshake_at is None:
                peer.on_data_sent(now)
        else:
            self.counters["tx_keepalive"] += 1

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        kp = peer.current
        if kp is not None and kp.can_send(now):
            self._encrypt(peer, kp, _KEEPALIVE, now)
        else:
            self._initiate(peer, now)

    def _new_index(self) -> int:
        while True:
            idx = int.from_bytes(self.rng(4), "little")
            if idx not in self._index:
                return idx

    def _initiate(self, peer: Peer, now: float, *, retry: bool = False) -> None:
        if not retry and peer.handshake is not None:
            return                                   # one in flight; its timer will retry
        if now - peer.last_initiation_sent < HANDSHAKE_INITIATION_RATE:
            return
        if peer.endpoint is None:
            self.counters["tx_no_endpoint"] += 1
            return
        if peer.handshake_index is not None:
            self._index.pop(peer.handshake_index, None)
        idx = self._new_index()
        cookie = peer.cookie if peer.cookie is not None and now - peer.cookie_time < COOKIE_REFRESH_TIME else None
        msg, st = ikpsk2.create_initiation(
            static_priv=self._priv, static_pub=self._pub, peer_pub=peer.static_pub,
            precomputed_ss=peer.precomputed_ss, sender_index=idx, wall=now + self.wall_offset,
            rng=self.rng, peer_mac1_key=peer.mac1_key, cookie=cookie, now=now)
        peer.handshake, peer.handshake_index = st, idx
        self._index[idx] = (peer, None)
        peer.last_initiation_sent = now
        peer.last_sent_mac1 = msg[116:132]
        if not retry:
            peer.handshake_attempts = 0
        peer.handshake_attempts += 1
        peer.rekey_timeout_jitter = int.from_bytes(self.rng(2), "little") / 65535 * REKEY_TIMEOUT_JITTER_MAX
        peer.retransmit_at = now + REKEY_TIMEOUT + peer.rekey_timeout_jitter
        self._outbound.append((msg, peer.endpoint))
        peer.tx_bytes += len(msg)
        peer.tx_packets += 1
        peer.on_any_sent(now)
        self.counters["handshake_initiated"] += 1

    # -- receiving ------------------------------------------------------------------------
    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        self.counters["rx_datagrams"] += 1
        n = len(data)
        if n < 4:
            self.counters["rx_short"] += 1
            return
        if n >= 32 and data[0] == 4 and data[1:4] == b"\0\0\0":
            self._receive_data(data, addr, now)
        elif data[1:4] != b"\0\0\0":
            self.counters["rx_bad_type"] += 1
        elif data[0] == 1:
            if n != ikpsk2.INITIATION_LEN:
                self.counters["rx_short"] += 1
            else:
                self._receive_initiation(data, addr, now)
        elif data[0] == 2:
            if n != ikpsk2.RESPONSE_LEN:
                self.counters["rx_short"] += 1
            else:
                self._receive_response(data, addr, now)
        elif data[0] == 3:
            self._receive_cookie(data, now)
        elif data[0] == 4:
            self.counters["rx_short"] += 1
        else:
            self.counters["rx_bad_type"] += 1

    def receive_datagrams(self, datagrams, now: float) -> None:
        """A batch [(data, addr), ...] (one wakeup's reads): the same as receive_datagram for
        each, with the transport-data case handled without the dispatch."""
        rx_run = self._receive_data_run
        rx_other = self.receive_datagram
        n_data = 0
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            if len(data) >= 32 and data[0] == 4 and data[1:4] == b"\0\0\0":
                j = rx_run(datagrams, i, n, now)
                n_data += j - i
                i = j
            else:
                rx_other(data, addr, now)
                i += 1
        self.counters["rx_datagrams"] += n_data

    def _receive_data_run(self, datagrams, i: int, n: int, now: float) -> int:
        """_receive_data for the run of transport-data datagrams from datagrams[i] on that
        share its receiver index and source -> the index after the run.  The session lookup
        and checks, and the peer bookkeeping, happen once per run; the replay window,
        decryption and the inner-packet checks stay per packet."""
        data, addr = datagrams[i]
        _, idx, _ = _unpack_data_hdr(data)
        owner = self._index.get(idx)
        if (owner is None or owner[1] is None or owner[1] is owner[0].next
                or now - owner[1].created >= REJECT_AFTER_TIME):
            self._receive_data(data, addr, now)      # unknown, expiring or first use: one by one
            return i + 1
        peer, kp = owner
        replay = kp.replay
        seen, accept = replay.seen_or_too_old, replay.accept
        decrypt = kp.recv.decrypt
        lookup = self.allowed.lookup_packed
        inbound = self._inbound.append
        counters = self.counters
        authenticated = rx_bytes = n_inner = 0
        k = i
        while k < n:
            data, a = datagrams[k]
            if (a is not addr and a != addr) or len(data) < 32 or data[0] != 4 \
                    or data[1:4] != b"\0\0\0":
                break
            _, idx2, counter = _unpack_data_hdr(data)
            if idx2 != idx:
                break
            k += 1
            if seen(counter):
                counters["rx_replay"] += 1
                continue
            try:
                plain = decrypt(_NONCE(counter), data[16:], None)
            except InvalidTag:
                counters["rx_decrypt_failed"] += 1
                continue
            if not accept(counter):
                counters["rx_replay"] += 1
                continue
            authenticated += 1
            rx_bytes += len(data)
            if not plain:
                counters["rx_keepalive"] += 1
                continue
            # strip padding by the inner IP length; check the source is one the peer may use
            v = plain[0] >> 4
            if v == 4 and len(plain) >= 20:
                size = _U16(plain, 2)[0]
                src_owner = lookup(plain[12:16])
            elif v == 6 and len(plain) >= 40:
                size = 40 + _U16(plain, 4)[0]
                src_owner = lookup(plain[8:24])
            else:
                counters["rx_bad_inner"] += 1
                continue
            if size > len(plain) or size < 20:
                counters["rx_bad_inner"] += 1
                continue
            if src_owner is not peer:
                counters["rx_src_not_allowed"] += 1
                continue
            n_inner += 1
            inbound(plain if size == len(plain) else plain[:size])
        if authenticated:
            if peer.endpoint != addr:
                peer.endpoint = addr                 # roaming: authenticated source wins
            peer.rx_bytes += rx_bytes
            peer.rx_packets += authenticated
            peer.new_handshake_at = None             # peer.on_any_authenticated_received
            cur = peer.current
            if cur is not None and cur.initiator and now - cur.created > REKEY_ON_RECEIVE_AGE:
                self._initiate(peer, now)
            if n_inner:
                counters["rx_data"] += n_inner
                if peer.keepalive_at is None:        # peer.on_data_received
                    peer.keepalive_at = now + KEEPALIVE_TIMEOUT
        return k

    def _receive_data(self, data: bytes, addr, now: float) -> None:
        _, idx, counter = _unpack_data_hdr(data)
        owner = self._index.get(idx)
        if owner is None or owner[1] is None:
            self.counters["rx_unknown_index"] += 1
            return
        peer, kp = owner
        replay = kp.replay
        if replay.seen_or_too_old(counter):
            self.counters["rx_replay"] += 1
            return
        if now - kp.created >= REJECT_AFTER_TIME:
            self.counters["rx_expired_keypair"] += 1
            return
        try:
            plain = kp.recv.decrypt(_NONCE(counter), data[16:], None)
        except InvalidTag:
            self.counters["rx_decrypt_failed"] += 1
            return
        if not replay.accept(counter):
            self.counters["rx_replay"] += 1
            return
        if peer.endpoint != addr:
            peer.endpoint = addr                     # roaming: authenticated source wins
        peer.rx_bytes += len(data)
        peer.rx_packets += 1
        if kp is peer.next:
            self._forget(peer.confirm_next(kp))
            if peer.staged and peer.handshake is None:
                staged, peer.staged = peer.staged, type(peer.staged)()
                for pkt in staged:
                    self._encrypt(peer, kp, pkt, now)
        peer.new_handshake_at = None                 # peer.on_any_authenticated_received
        cur = peer.current
        if cur is not None and cur.initiator and now - cur.created > REKEY_ON_RECEIVE_AGE:
            self._initiate(peer, now)
        if not plain:
            self.counters["rx_keepalive"] += 1
            return
        # strip padding by the inner IP length; check the source is one the peer may use
        v = plain[0] >> 4
        if v == 4 and len(plain) >= 20:
            size = _U16(plain, 2)[0]
            src_owner = self.allowed.lookup_packed(plain[12:16])
        elif v == 6 and len(plain) >= 40:
            size = 40 + _U16(plain, 4)[0]
            src_owner = self.allowed.lookup_packed(plain[8:24])
        else:
            self.counters["rx_bad_inner"] += 1
            return
        if size > len(plain) or size < 20:
            self.counters["rx_bad_inner"] += 1
            return
        if src_owner is not peer:
            self.counters["rx_src_not_allowed"] += 1
            return
        self.counters["rx_data"] += 1
        if peer.keepalive_at is None:                # peer.on_data_received
            peer.keepalive_at = now + KEEPALIVE_TIMEOUT
        self._inbound.append(plain if size == len(plain) else plain[:size])

    def _under_load(self, now: float) -> bool:
        if now - self._load_window_start >= 1.0:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += 1
        return self.force_under_load or self._load_count > self.under_load_threshold

    def _cookie_for(self, addr, now: float) -> bytes:
        if now - self._cookie_secret_at >= COOKIE_REFRESH_TIME:
            self._cookie_secret = self.rng(32)
            self._cookie_secret_at = now
        return ikpsk2.make_cookie(self._cookie_secret, repr(addr).encode())

    def _check_macs(self, msg: bytes, addr, now: float) -> bool:
        """mac1 always; under load, mac2 too, answering with a cookie reply when it fails."""
        if not ikpsk2.check_mac1(msg, self._our_mac1_key):
            self.counters["mac1_invalid"] += 1
            return False
        if self._under_load(now):
            cookie = self._cookie_for(addr, now)
            if not ikpsk2.check_mac2(msg, cookie):
                self.counters["mac2_invalid"] += 1
                reply = ikpsk2.create_cookie_reply(msg, our_cookie_key=self._our_cookie_key,
                                                   cookie=cookie, rng=self.rng)
                self._outbound.append((reply, addr))
                self.counters["cookie_sent"] += 1
                return False
        return True

    def _receive_initiation(self, msg: bytes, addr, now: float) -> None:
        self.counters["rx_initiation"] += 1
        if not self._check_macs(msg, addr, now):
            return
        init = ikpsk2.consume_initiation(
            msg, static_priv=self._priv, static_pub=self._pub,
            lookup_ss=lambda pub: (p.precomputed_ss if (p := self._by_static.get(pub)) else None))
        if init is None:
            # either the box did not open or the static key is not a configured peer
            self.counters["handshake_decrypt_failed"] += 1
            return
        peer = self._by_static[init.peer_pub]
        if init.timestamp <= peer.latest_timestamp:
            self.counters["handshake_replayed_timestamp"] += 1
            return
        if now - peer.last_initiation_consumed < HANDSHAKE_INITIATION_RATE:
            self.counters["handshake_flood"] += 1
            return
        peer.latest_timestamp = init.timestamp
        peer.last_initiation_consumed = now
        idx = self._new_index()
        cookie = peer.cookie if peer.cookie is not None and now - peer.cookie_time < COOKIE_REFRESH_TIME else None
        resp, send_key, recv_key = ikpsk2.create_response(
            init, peer_pub=peer.static_pub, psk=peer.psk, sender_index=idx, rng=self.rng,
            peer_mac1_key=peer.mac1_key, cookie=cookie)
        kp = Keypair(send_key, recv_key, idx, init.remote_index, now, False, peer)
        self._forget(peer.install_responder_keypair(kp))
        self._index[idx] = (peer, kp)
        peer.endpoint = addr
        peer.last_sent_mac1 = resp[60:76]
        self._outbound.append((resp, addr))
        peer.tx_bytes += len(resp)
        peer.rx_bytes += len(msg)
        peer.tx_packets += 1
        peer.rx_packets += 1
        peer.on_any_sent(now)
        self._handshake_done(peer, now)

    def _receive_response(self, msg: bytes, addr, now: float) -> None:
        self.counters["rx_response"] += 1
        receiver = ikpsk2.parse_index(msg, 8)
        owner = self._index.get(receiver)
        if owner is None or owner[1] is not None or owner[0].handshake is None:
            self.counters["response_unexpected"] += 1
            return
        if not self._check_macs(msg, addr, now):
            return
        peer = owner[0]
        res = ikpsk2.consume_response(msg, peer.handshake, static_priv=self._priv, psk=peer.psk)
        if res is None:
            self.counters["handshake_decrypt_failed"] += 1
            return
        remote_index, send_key, recv_key = res
        idx = peer.handshake_index
        kp = Keypair(send_key, recv_key, idx, remote_index, now, True, peer)
        self._index[idx] = (peer, kp)
        peer.handshake = None
        peer.handshake_index = None
        peer.retransmit_at = None
        peer.endpoint = addr
        peer.rx_bytes += len(msg)
        peer.rx_packets += 1
        self._forget(peer.install_initiator_keypair(kp))
        peer.on_any_authenticated_received(now)
        self._handshake_done(peer, now)
        # confirm the session to the responder: staged packets, or a keepalive
        if peer.staged:
            staged, peer.staged = peer.staged, type(peer.staged)()
            for pkt in staged:
                self._encrypt(peer, kp, pkt, now)
        else:
            self._encrypt(peer, kp, _KEEPALIVE, now)

    def _handshake_done(self, peer: Peer, now: float) -> None:
        peer.last_handshake = now
        peer.last_handshake_wall = now + self.wall_offset
        peer.handshakes_completed += 1
        peer.zero_keys_at = now + ZERO_KEYS_AFTER
        self.counters["handshake_completed"] += 1

    def _receive_cookie(self, msg: bytes, now: float) -> None:
        self.counters["rx_cookie"] += 1
        if len(msg) != ikpsk2.COOKIE_LEN:
            self.counters["cookie_invalid"] += 1
            return
        owner = self._index.get(ikpsk2.parse_index(msg, 4))
        if owner is None:
            self.counters["cookie_invalid"] += 1
            return
        peer = owner[0]
        cookie = ikpsk2.consume_cookie_reply(msg, peer_cookie_key=peer.cookie_key,
                                             our_last_mac1=peer.last_sent_mac1)
        if cookie is None:
            self.counters["cookie_invalid"] += 1
            return
        peer.cookie, peer.cookie_time = cookie, now
        # the retransmit timer resends the initiation, now with a valid mac2

    def _forget(self, keypairs) -> None:
        for kp in keypairs:
            owner = self._index.get(kp.local_index)
            if owner is not None and owner[1] is kp:
                del self._index[kp.local_index]

    # -- timers ---------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        best = None
        for peer in self.peers.values():
            d = peer.next_deadline()
            if d is not None and (best is None or d < best):
                best = d
        return best

    def handle_timer(self, now: float) -> None:
        for peer in list(self.peers.values()):
            if peer.retransmit_at is not None and now >= peer.retransmit_at:
                peer.retransmit_at = None
                if peer.handshake_attempts >= MAX_TIMER_HANDSHAKES:
                    # give up: drop what waited for this session; a new send starts over
                    self.counters["handshake_gave_up"] += 1
                    self.counters["tx_staged_dropped"] += len(peer.staged)
                    peer.staged.clear()
                    peer.handshake = None
                    if peer.handshake_index is not None:
                        self._index.pop(peer.handshake_index, None)
                        peer.handshake_index = None
                    if peer.zero_keys_at is None:
                        peer.zero_keys_at = now + ZERO_KEYS_AFTER
                else:
                    self._initiate(peer, now, retry=True)
            if peer.keepalive_at is not None and now >= peer.keepalive_at:
                peer.keepalive_at = None
                self._send_keepalive(peer, now)
            if peer.new_handshake_at is not None and now >= peer.new_handshake_at:
                peer.new_handshake_at = None
                self._initiate(peer, now)
            if peer.zero_keys_at is not None and now >= peer.zero_keys_at:
                peer.zero_keys_at = None
                self._forget(peer.clear_keypairs())
                self.counters["keypairs_zeroed"] += 1
            if peer.persistent_at is not None and now >= peer.persistent_at:
                peer.persistent_at = None
                self._send_keepalive(peer, now)
            if peer.persistent_keepalive and peer.persistent_at is None:
                peer.persistent_at = now + peer.persistent_keepalive

    # -- status ---------------------------------------------------------------------------
    def peer_status(self) -> list[dict]:
        out = []
        for peer in self.peers.values():
            out.append({
                "public_key": peer.public.b64(),
                "endpoint": peer.endpoint,
                "last_handshake": peer.last_handshake_wall,
                "handshakes": peer.handshakes_completed,
                "rx_bytes": peer.rx_bytes,
                "tx_bytes": peer.tx_bytes,
                "rx_packets": peer.rx_packets,
                "tx_packets": peer.tx_packets,
                "allowed_ips": [str(n) for n in self.allowed.entries(peer)],
                "staged": len(peer.staged),
            })
        return out

    @staticmethod
    def ip_version(packet: bytes) -> int:
        return packet[0] >> 4 if packet else 0


def network(text: str):
    return ipaddress.ip_network(text, strict=False)
