"""Per-peer WireGuard state: keypairs (previous/current/next), handshake, timers as deadlines.

Timer semantics follow wireguard-go's `timers.go`, expressed as absolute deadlines that the
device folds into one `next_deadline()`:

    retransmit_at      handshake sent, no response yet: resend after REKEY_TIMEOUT + jitter,
                       give up after MAX_TIMER_HANDSHAKES attempts (staged packets dropped)
    keepalive_at       we received data and have sent nothing since: passive keepalive
    new_handshake_at   we sent data and have heard nothing since: start a new handshake
    zero_keys_at       long after the last handshake: forget every key
    persistent_at      PersistentKeepalive: a keepalive after this long without sending
"""

from __future__ import annotations

import collections

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tsproxy.wg.constants import (KEEPALIVE_TIMEOUT, MAX_STAGED_PACKETS, REJECT_AFTER_MESSAGES,
                                  REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME,
                                  REKEY_ON_RECEIVE_AGE, REKEY_TIMEOUT)
from tsproxy.wg.replay import ReplayFilter


class Keypair:
    """One session: an AEAD per direction, our index, theirs, a send counter, a replay window."""

    __slots__ = ("send", "recv", "local_index", "remote_index", "created", "initiator",
                 "send_counter", "replay", "peer")

    def __init__(self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
                 created: float, initiator: bool, peer):
        self.send = ChaCha20Poly1305(send_key)
        self.recv = ChaCha20Poly1305(recv_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.initiator = initiator
        self.send_counter = 0
        self.replay = ReplayFilter()
        self.peer = peer

    def can_send(self, now: float) -> bool:
        return (now - self.created < REJECT_AFTER_TIME
                and self.send_counter < REJECT_AFTER_MESSAGES)

    def can_receive(self, now: float) -> bool:
        return now - self.created < REJECT_AFTER_TIME


class Peer:
    def __init__(self, public, *, static_pub: bytes, precomputed_ss: bytes, psk: bytes,
                 mac1_key: bytes, cookie_key: bytes, endpoint, persistent_keepalive: float):
        self.public = public                       # NodePublic
        self.static_pub = static_pub
        self.precomputed_ss = precomputed_ss       # DH(our static, their static), cached
        self.psk = psk
        self.mac1_key = mac1_key                   # for messages we send to them
        self.cookie_key = cookie_key               # decrypts cookie replies they send us
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive

        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.handshake = None                      # ikpsk2.InitiatorState while initiating
        self.handshake_index: int | None = None
        self.handshake_attempts = 0
        self.last_initiation_sent = -1e9
        self.last_initiation_consumed = -1e9       # responder-side flood limit
        self.latest_timestamp = b""                # TAI64N replay protection
        self.cookie: bytes | None = None           # mac2 key, from their cookie reply
        self.cookie_time = -1e9
        self.last_sent_mac1 = b""
        self.staged: collections.deque = collections.deque()
        self.staged_dropped = 0

        self.retransmit_at: float | None = None
        self.keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_keys_at: float | None = None
        self.persistent_at: float | None = None

        self.last_handshake: float | None = None   # device clock
        self.last_handshake_wall: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0            # authenticated datagrams (data, keepalive, handshake)
        self.tx_packets = 0
        self.handshakes_completed = 0

    # -- keypairs -------------------------------------------------------------------------
    def keypairs(self):
        return [k for k in (self.previous, self.current, self.next) if k is not None]

    def install_initiator_keypair(self, kp: Keypair) -> list[Keypair]:
        """Initiator: the new session is usable at once.  Returns keypairs that died."""
        dead = [k for k in (self.previous, self.next) if k is not None]
        self.previous, self.current, self.next = self.current, kp, None
        return dead

    def install_responder_keypair(self, kp: Keypair) -> list[Keypair]:
        """Responder: keep it as `next` until the initiator proves it by sending data on it."""
        dead = []
        if self.next is not None:
            dead.append(self.next)
            self.next = kp
            return dead
        if self.previous is not None:
            dead.append(self.previous)
        self.previous, self.next = None, kp
        return dead

    def confirm_next(self, kp: Keypair) -> list[Keypair]:
        """First data on the `next` keypair: rotate it in."""
        dead = [self.previous] if self.previous is not None else []
        self.previous, self.current, self.next = self.current, kp, None
        return dead

    def clear_keypairs(self) -> list[Keypair]:
        dead = self.keypairs()
        self.previous = self.current = self.next = None
        return dead

    # -- rekey decisions --------------------------------------------------------------------
    def wants_rekey_on_send(self, kp: Keypair, now: float) -> bool:
        return (kp.send_counter > REKEY_AFTER_MESSAGES
                or (kp.initiator and now - kp.created > REKEY_AFTER_TIME))

    def wants_rekey_on_receive(self, now: float) -> bool:
        kp = self.current
        return kp is not None and kp.initiator and now - kp.created > REKEY_ON_RECEIVE_AGE

    # -- timers ----------------------------------------------------------------------------
    def on_data_sent(self, now: float) -> None:
        # we expect to hear back; if not, a handshake will find out why
        if self.new_handshake_at is None:
            self.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self.rekey_timeout_jitter
        self.keepalive_at = None

    def on_any_sent(self, now: float) -> None:
        self.keepalive_at = None
        if self.persistent_keepalive:
            self.persistent_at = now + self.persistent_keepalive

    def on_data_received(self, now: float) -> None:
        if self.keepalive_at is None:
            self.keepalive_at = now + KEEPALIVE_TIMEOUT

    def on_any_authenticated_received(self, now: float) -> None:
        self.new_handshake_at = None

    rekey_timeout_jitter = 0.0                     # set per attempt by the device (rng)

    def next_deadline(self) -> float | None:
        best = None
        for d in (self.retransmit_at, self.keepalive_at, self.new_handshake_at, self.zero_keys_at,
                  self.persistent_at):
            if d is not None and (best is None or d < best):
                best = d
        return best

    def stage(self, packet: bytes) -> bool:
        if len(self.staged) >= MAX_STAGED_PACKETS:
            self.staged.popleft()
            self.staged_dropped += 1
            self.staged.append(packet)
            return False
        self.staged.append(packet)
        return True
