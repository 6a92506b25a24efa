"""Proxy credentials: one user name and password, compared in constant time, for SOCKS5
(RFC 1929) and HTTP (`Proxy-Authorization: Basic`) alike.  The password never appears in a
repr, a log line or an error."""

from __future__ import annotations

import base64
import binascii
import hmac


class ProxyAuth:
    def __init__(self, user: str, password: str):
        self._user = user.encode()
        self._password = password.encode()

    def __repr__(self) -> str:
        return "ProxyAuth(<redacted>)"

    def check(self, user: bytes, password: bytes) -> bool:
        ok_user = hmac.compare_digest(user, self._user)
        ok_pass = hmac.compare_digest(password, self._password)
        return ok_user & ok_pass

    def check_basic(self, header_value: str | None) -> bool:
        if not header_value:
            return False
        scheme, _, token = header_value.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = raw.partition(b":")
        return bool(sep) and self.check(user, password)
