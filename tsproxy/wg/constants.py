"""WireGuard protocol constants (whitepaper section 6; PROTOCOL.md 7.2)."""

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 0.020          # at most one initiation per peer per 20 ms
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)   # 18 attempts
# A receiving initiator rekeys this long before its keypair would be rejected.
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
ZERO_KEYS_AFTER = REJECT_AFTER_TIME * 3

MAX_STAGED_PACKETS = 1024                  # per peer, while a handshake is in flight
REPLAY_WINDOW = 8128                       # max distance behind the highest counter still accepted
                                           # (wireguard-go windowSize: (128 blocks - 1) * 64 bits)
UNDER_LOAD_HANDSHAKES_PER_SECOND = 256     # device-wide initiations before we demand cookies
