"""Sans-IO login decisions (Go `doLogin`, PROTOCOL.md 4.1-4.5); aio.py does the I/O.

    flow = LoginFlow(ident, auth_key=..., force_regen=..., rng=...)
    while not flow.done:
        attempt = flow.next_attempt()          # which keys / followup / auth to send
        flow.on_response(parse_register_response(...))   # may raise
    flow.auth_url_changed tells the caller to surface a new AuthURL.

Rules: a new random node key when there is none yet, when we were told to regenerate (self key
expired), or when the server answers NodeKeyExpired; OldNodeKey = the key being replaced.
An AuthURL is followed up with the same node key and no auth key, until the server authorizes.
A non-empty Error is AuthKeyRejected when we sent an auth key (no retry), else a protocol error.
On success `ident` is updated (node key committed, old key kept, login fields).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tsproxy.errors import RemoteProtocolError, TsproxyError
from tsproxy.keys import NodePrivate

MAX_REGENERATIONS = 8


class AuthKeyRejected(TsproxyError):
    """The control server refused our auth key (one clear line; not retried)."""


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
        self._has_auth = bool(auth_key)
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

    def next_attempt(self) -> RegisterAttempt:
        return RegisterAttempt(self._new, self._old, self._followup,
                               self._has_auth and not self._followup)

    def on_response(self, r) -> None:
        """Feed a parsed RegisterResponse."""
        self.auth_url_changed = False
        if r.error:
            if self._has_auth:
                raise AuthKeyRejected(f"control server rejected the auth key: {r.error[:200]}")
            raise RemoteProtocolError(f"register: {r.error[:200]}")
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
