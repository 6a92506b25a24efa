"""DNS over HTTP (RFC 8484 POST) framing for a peer's peer API, free of I/O.

tailscaled serves DoH at `http://<peer ip>:<peerapi port>/dns-query` (ipn/ipnlocal/peerapi.go
handleDNSQuery): plain HTTP over WireGuard, POST with `Content-Type: application/dns-message`
and the DNS message as the body (or GET `?dns=` base64url); it answers 200 with an
`application/dns-message` body, 403 "DNS access denied" when its packet filter would not let
us reach 0.0.0.0:53 (no autogroup:internet), 400 for a bad query, 500 for a forwarding error.
One request per connection (`Connection: close`), read to the end.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tsproxy.errors import RemoteProtocolError

MAX_RESPONSE = 64 * 1024


class DohError(RemoteProtocolError):
    pass


def split_url(url: str) -> tuple[str, int, str]:
    """http://HOST:PORT/PATH -> (host, port, path); ValueError for anything else."""
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname or not u.port:
        raise ValueError(f"not an http://HOST:PORT/ DoH URL: {url!r}")
    return u.hostname, u.port, u.path or "/dns-query"


def build_request(host: str, port: int, path: str, query: bytes) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = (f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
            "Content-Type: application/dns-message\r\nAccept: application/dns-message\r\n"
            f"Content-Length: {len(query)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + query


def parse_response(raw: bytes) -> bytes:
    """The whole HTTP response (read to EOF) -> the DNS message; DohError with the server's
    status and first line of its body otherwise."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise DohError("truncated HTTP response")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise DohError("not an HTTP response")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    elif b"content-length" in headers:
        try:
            n = int(headers[b"content-length"])
        except ValueError:
            raise DohError("bad Content-Length") from None
        if len(body) < n:
            raise DohError("truncated body")
        body = body[:n]
    if status != 200:
        text = body.decode("utf-8", "replace").strip().splitlines()
        raise DohError(f"HTTP {status}" + (f" ({text[0][:200]})" if text else ""))
    ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if ctype != b"application/dns-message":
        raise DohError(f"unexpected Content-Type {ctype.decode('latin-1')!r}")
    return body


def _dechunk(body: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        j = body.find(b"\r\n", i)
        if j < 0:
            raise DohError("truncated chunk")
        try:
            n = int(body[i:j].split(b";")[0], 16)
        except ValueError:
            raise DohError("bad chunk size") from None
        if n == 0:
            return bytes(out)
        out += body[j + 2:j + 2 + n]
        if len(body) < j + 2 + n:
            raise DohError("truncated chunk")
        i = j + 4 + n
