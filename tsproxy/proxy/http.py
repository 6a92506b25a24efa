"""HTTP/1.1 proxy request/response heads, sans-IO (RFC 9110/9112).

parse_request_head / parse_response_head take the bytes received so far and return None while
the head is incomplete, or (head, consumed).  A head longer than `limit` raises HeaderTooLarge
(the server answers 431); anything malformed raises RemoteProtocolError (400).
"""

from __future__ import annotations

from tsproxy.errors import RemoteProtocolError

MAX_HEAD = 32 * 1024
MAX_HEADERS = 100

# RFC 9110 7.6.1 hop-by-hop fields, plus the proxy-only ones
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"))

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HeaderTooLarge(RemoteProtocolError):
    pass


class Head:
    __slots__ = ("method", "target", "version", "status", "reason", "headers")

    def __init__(self, method, target, version, status, reason, headers):
        self.method, self.target, self.version = method, target, version
        self.status, self.reason, self.headers = status, reason, headers

    def get(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def tokens(self, name: bytes) -> set[bytes]:
        """Comma-separated values of every `name` field, lower-cased."""
        name = name.lower()
        out: set[bytes] = set()
        for k, v in self.headers:
            if k.lower() == name:
                out.update(t.strip().lower() for t in v.split(b",") if t.strip())
        return out


def _split_head(buf: bytes, limit: int):
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > limit:
            raise HeaderTooLarge("header block too large")
        return None
    if end + 4 > limit:
        raise HeaderTooLarge("header block too large")
    lines = bytes(buf[:end]).split(b"\r\n")
    return lines, end + 4


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    if len(lines) > MAX_HEADERS:
        raise HeaderTooLarge("too many header fields")
    out = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or not all(c in _TOKEN for c in name):
            raise RemoteProtocolError("malformed header field")
        out.append((name, value.strip(b" \t")))
    return out


def parse_request_head(buf: bytes, limit: int = MAX_HEAD):
    r = _split_head(buf, limit)
    if r is None:
        return None
    lines, used = r
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1] or not all(c in _TOKEN for c in parts[0]):
        raise RemoteProtocolError("malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise RemoteProtocolError("unsupported HTTP version")
    return Head(method.decode(), target.decode("latin-1"), version, 0, b"", _fields(lines[1:])), used


def parse_response_head(buf: bytes, limit: int = MAX_HEAD):
    r = _split_head(buf, limit)
    if r is None:
        return None
    lines, used = r
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise RemoteProtocolError("malformed status line")
    reason = parts[2] if len(parts) == 3 else b""
    return Head("", "", parts[0], int(parts[1]), reason, _fields(lines[1:])), used


def content_length(head: Head) -> int | None:
    vals = {v.strip() for k, v in head.headers if k.lower() == b"content-length"}
    if not vals:
        return None
    if len(vals) != 1:
        raise RemoteProtocolError("conflicting Content-Length")
    v = vals.pop()
    if not v.isdigit() or len(v) > 18:
        raise RemoteProtocolError("bad Content-Length")
    return int(v)


def is_chunked(head: Head) -> bool:
    te = head.tokens(b"transfer-encoding")
    if not te:
        return False
    if b"chunked" not in te:
        raise RemoteProtocolError("unsupported Transfer-Encoding")
    return True


def split_absolute(target: str):
    """'http://host[:port]/path' -> (host, port, '/path'); raises for anything else."""
    if not target.lower().startswith("http://"):
        raise RemoteProtocolError("only http:// absolute URIs are proxied (use CONNECT for TLS)")
    rest = target[7:]
    slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:slash], rest[slash:] or "/"
    if path.startswith("?"):
        path = "/" + path
    if "@" in authority:
        raise RemoteProtocolError("credentials in the request URI")
    host, port = split_authority(authority, 80)
    return host, port, path


def split_authority(authority: str, default_port: int | None = None):
    """'host:port', '[v6]:port' (or without a port if default_port) -> (host, port)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise RemoteProtocolError("bad IPv6 authority")
        host, rest = authority[1:end], authority[end + 1:]
        port_s = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep:
            host, port_s = authority, ""
    if port_s is None or not host:
        raise RemoteProtocolError("bad authority")
    if not port_s:
        if default_port is None:
            raise RemoteProtocolError("authority without a port")
        return host, default_port
    if not (port_s.isascii() and port_s.isdigit()) or not 0 < int(port_s) < 65536:   # "1²" is a digit
        raise RemoteProtocolError("bad port")
    return host, int(port_s)


def serialize_head(first_line: bytes, headers) -> bytes:
    return first_line + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"


def end_to_end(head: Head) -> list[tuple[bytes, bytes]]:
    """Headers without the hop-by-hop ones, including those named by Connection."""
    drop = HOP_BY_HOP | head.tokens(b"connection")
    return [(k, v) for k, v in head.headers if k.lower() not in drop]


def error_response(status: int, reason: str, extra: list[tuple[bytes, bytes]] = (), close=True,
                   detail: str = "") -> bytes:
    """`detail` (e.g. why a dial failed) goes on a second body line, printable ASCII only."""
    detail = "".join(c if " " <= c <= "~" else "?" for c in detail[:300])
    body = (f"{status} {reason}\n" + (f"{detail}\n" if detail else "")).encode()
    hdrs = [(b"Content-Type", b"text/plain"), (b"Content-Length", str(len(body)).encode())]
    hdrs += list(extra)
    if close:
        hdrs.append((b"Connection", b"close"))
    return serialize_head(f"HTTP/1.1 {status} {reason}".encode(), hdrs) + body
