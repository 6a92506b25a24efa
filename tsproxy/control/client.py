"""Sans-IO login decisions (Go `doLogin`, PROTOCOL.md 4.1-4.5); aio.py does the I/O.

    flow = LoginFlow(ident, auth_key=..., force_regen=..., rng=...)
    while not flow.done:
        attempt = flow.next_attempt()          # which keys / followup / auth to send
        flow.on_response(parse_register_response(...))   # may raise
    flow.auth_url_changed tells the caller to surface a new AuthURL.

Rules: a new random node key when there is none yet, when we were told to regenerate (self key
expired), or when the server answers NodeKeyExpired; OldNodeKey = the key being replaced.
An AuthURL is followed up with the same node key and no auth key, until the server authorizes.

The auth key is sent only while we have no registered identity (no node key yet), as Go's
backend hands the key to the control client only when it is not logged in: a reconnect or a
restart never re-presents it, so an expired or used pre-auth key cannot break a working node.
If the server answers AuthURL for a stored identity it no longer knows, the key is tried once
(as `tailscale up --authkey` in NeedsLogin would) -- except after our key expired: an admin's
expiry must not be undone by a reusable key, so we wait in NeedsLogin (Go does the same).

A non-empty Error is AuthKeyRejected only when we sent the key and the error is about the key
(not "node key in use" or a server fault, which are retried); else a protocol error.
On success `ident` is updated (node key committed, old key kept, login fields).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from tsproxy.errors import RemoteProtocolError, TsproxyError
from tsproxy.keys import NodePrivate

MAX_REGENERATIONS = 8


class AuthKeyRejected(TsproxyError):
    """The control server refused our auth key (one clear line; not retried)."""


def retry_after_seconds(value: str | None, now: float, rand01: float) -> float:
    """A 429's Retry-After (seconds or an HTTP date) as Go's parseRateLimitError reads it;
    absent, unparsable, <= 0 or over an hour: 5 s plus a random 0-5 s."""
    delay = 0.0
    v = (value or "").strip()
    if v.isdigit():
        delay = float(int(v))
    elif v:
        try:
            delay = parsedate_to_datetime(v).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            delay = 0.0
    if delay <= 0 or delay > 3600:
        delay = 5.0 + 5.0 * rand01
    return delay


_NOT_ABOUT_THE_AUTH_KEY = ("node key", "nodekey", "machine key", "machinekey")


def is_auth_key_error(text: str) -> bool:
    """Does a RegisterResponse.Error (sent in answer to our auth key) reject that key?
    Headscale: "invalid authkey", "authkey expired", "AuthKey already used"...; Tailscale:
    "invalid key: ..."; but "node key already in use" and server faults are not."""
    t = text.lower()
    if any(s in t for s in _NOT_ABOUT_THE_AUTH_KEY):
        return False
    return "key" in t or "unauthori" in t


@dataclass(frozen=True)
class RegisterAttempt:
    node_key: NodePrivate
    old_node_key: NodePrivate | None
    followup: str
    send_auth: bool

    def __repr__(self) -> str:
        return (f"RegisterAttempt(node={self.node_key.public().short()}, "
                f"followup={bool(self.followup)}, auth={self.send_auth})")


class LoginFlow:
    def __init__(self, ident, *, auth_key: str | None, force_regen: bool = False,
                 rng=os.urandom):
        self._ident = ident
        # the key goes with the first login only (no identity yet); see the module doc
        self._has_auth = bool(auth_key) and ident.node_key is None
        self._auth_fallback = bool(auth_key) and ident.node_key is not None and not force_regen
        self.key_expired = force_regen
        self._rng = rng
        self.done = False
        self.auth_url = ""
        self.auth_url_changed = False
        self._regens = 0
        self._followup = ""
        self._start(ident.node_key is None or force_regen)

    def _start(self, regen: bool) -> None:
        ident = self._ident
        self._regen = regen
        if regen:
            self._regens += 1
            if self._regens > MAX_REGENERATIONS:
                raise RemoteProtocolError("register: server keeps expiring our node key")
            self._old = ident.node_key if ident.node_key is not None else ident.old_node_key
            self._new = NodePrivate.generate(self._rng)
        else:
            self._old = ident.old_node_key
            self._new = ident.node_key
        self._followup = ""

    @property
    def sent_auth(self) -> bool:
        """Whether the current attempt carries the auth key."""
        return self._has_auth and not self._followup

    def next_attempt(self) -> RegisterAttempt:
        return RegisterAttempt(self._new, self._old, self._followup, self.sent_auth)

    def on_response(self, r) -> None:
        """Feed a parsed RegisterResponse."""
        self.auth_url_changed = False
        if r.error:
            if self.sent_auth and is_auth_key_error(r.error):
                raise AuthKeyRejected(f"control server rejected the auth key: {r.error[:200]}")
            raise RemoteProtocolError(f"register: {r.error[:200]}")
        if r.auth_url and self._auth_fallback and not self._followup:
            # the server no longer knows our stored node: present the key once
            self._auth_fallback = False
            self._has_auth = True
            return
        if r.auth_url:
            self.auth_url_changed = r.auth_url != self.auth_url
            self.auth_url = r.auth_url
            self._followup = r.auth_url
            return
        if r.node_key_expired:
            self._start(True)
            return
        ident = self._ident
        if self._regen:
            ident.old_node_key = self._old
        ident.node_key = self._new
        ident.login_name = r.login_name or ident.login_name
        ident.user_id = r.user_id or ident.user_id
        self.auth_url = ""
        self.done = True
