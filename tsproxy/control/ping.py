"""Control's PingRequest (PROTOCOL.md 3.15; Go control/controlclient/direct.go answerPing) and
the minimal c2n (control-to-node) HTTP handler, free of I/O; aio.py sends the answers.

    pr = parse_ping_request(obj)          # None if absent or unusable
    pr.kind: "head" (HEAD to URL; over Noise when URLIsNoise), "c2n" (run the HTTP request in
             Payload here, POST the HTTP response to URL over Noise), or "unsupported"
    c2n_answer(raw_request, health) -> (status, bytes)   # an HTTP/1.1 response, as Go's
                                                         # recorder writes it

c2n paths a client of our capability version must handle (docs/protocol-notes.md):
  /echo          the request body back (control's liveness probe, e.g. for HA subnet routers)
  /debug/health  health.State JSON, {"Warnings": {...}} (capver 128)
  /debug/netmap  501 "feature not included in this build", as Go built without the debug
                 feature answers (capver 127)
anything else (e.g. /debug/tka/log, capver 138: no tailnet lock here) is 404, as Go answers a
path it has no handler for; the caller counts those.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from tsproxy.errors import RemoteProtocolError

MAX_C2N_REQUEST = 1 << 20
HEAD_TIMEOUT = 15.0          # Go answerHeadPing
C2N_TIMEOUT = 60.0           # Go answerC2NPing's reply timeout


@dataclass(frozen=True)
class PingRequest:
    url: str
    url_is_noise: bool
    log: bool
    types: str
    payload: bytes

    @property
    def kind(self) -> str:
        if self.types == "":
            return "head"
        if self.types == "c2n":
            return "c2n"
        return "unsupported"         # disco/TSMP/ICMP/peerapi pings need a pinger we lack


def parse_ping_request(obj) -> PingRequest | None:
    if not isinstance(obj, dict):
        return None
    url = obj.get("URL")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    payload = obj.get("Payload") or ""
    try:
        raw = base64.b64decode(payload, validate=True) if isinstance(payload, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    types = obj.get("Types") if isinstance(obj.get("Types"), str) else ""
    return PingRequest(url=url, url_is_noise=obj.get("URLIsNoise") is True,
                       log=obj.get("Log") is True, types=types, payload=raw)


def _parse_http_request(raw: bytes) -> tuple[str, str, dict, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or len(raw) > MAX_C2N_REQUEST:
        raise RemoteProtocolError("c2n: not an HTTP request")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise RemoteProtocolError("c2n: bad request line")
    headers = {}
    for ln in lines[1:]:
        k, c, v = ln.partition(":")
        if not c:
            raise RemoteProtocolError("c2n: bad header line")
        headers[k.strip().lower()] = v.strip()
    n = headers.get("content-length")
    if n is not None:
        if not n.isdigit() or int(n) > len(body):
            raise RemoteProtocolError("c2n: bad Content-Length")
        body = body[:int(n)]
    return parts[0], parts[1], headers, body


def _response(status: int, reason: str, body: bytes, ctype: str) -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + body


def c2n_answer(raw_request: bytes, health: dict | None = None) -> tuple[int, bytes]:
    """Run one c2n request; `health` maps a warning code to its text (empty: healthy)."""
    try:
        method, target, _, body = _parse_http_request(raw_request)
    except RemoteProtocolError:
        return 400, _response(400, "Bad Request", b"bad request\n", "text/plain; charset=utf-8")
    path = target.split("?", 1)[0]
    if path == "/echo":
        return 200, _response(200, "OK", body, "application/octet-stream")
    if path == "/debug/health":
        warnings = {code: {"WarnableCode": code, "Severity": "medium", "Title": code,
                           "Text": text} for code, text in (health or {}).items()}
        return 200, _response(200, "OK", json.dumps({"Warnings": warnings}).encode() + b"\n",
                              "application/json")
    if path == "/debug/netmap":
        return 501, _response(501, "Not Implemented", b"feature not included in this build\n",
                              "text/plain; charset=utf-8")
    return 404, _response(404, "Not Found", b"404 page not found\n", "text/plain; charset=utf-8")


def c2n_response(raw_request: bytes) -> bytes:
    return c2n_answer(raw_request)[1]
