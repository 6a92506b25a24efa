"""Sans-IO HTTP/1.1 request framing for the test control server (RFC 9112).

Hand-written rather than h11: the TS2021 upgrade needs the raw request head and the bytes
after it handed untouched to the Noise handshake, the server needs only request framing, and
this keeps the package's runtime dependencies as the project card fixes them.

`RequestReader.feed()` bytes in; `next_head()` gives a parsed head (or None: need more), then
`next_body(head)` its body (or None).  Framing errors raise `BadFraming` carrying the status to
answer; after one the connection must be answered and closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
MAX_CHUNK_LINE = 1024


class BadFraming(Exception):
    def __init__(self, status: str, why: str):
        super().__init__(why)
        self.status = status


@dataclass
class RequestHead:
    method: str
    target: str
    version: tuple[int, int]
    headers: dict[str, str]          # lower-case name -> value (repeats joined with ", ")
    raw: bytes                       # the head as received, without the blank line
    content_length: int | None = None
    chunked: bool = False
    close_after: bool = False        # False: the connection stays open after the response
    tokens: set[str] = field(default_factory=set)   # Connection header tokens, lower case

    @property
    def expects_continue(self) -> bool:
        return self.version >= (1, 1) and self.headers.get("expect", "").lower() == "100-continue"


class RequestReader:
    def __init__(self, *, max_head: int, max_body: int):
        self.buf = bytearray()
        self.max_head = max_head
        self.max_body = max_body
        # chunked decoding state, kept across feeds
        self._body = bytearray()
        self._chunk_left = -1            # -1: expecting a size line; >=0 bytes of data left
        self._in_trailers = False

    def feed(self, data: bytes) -> None:
        self.buf += data

    def take_rest(self) -> bytes:
        rest = bytes(self.buf)
        self.buf.clear()
        return rest

    # -- head ------------------------------------------------------------------------------------
    def next_head(self) -> RequestHead | None:
        while self.buf.startswith(b"\r\n"):              # RFC 9112 2.2: ignore leading CRLFs
            del self.buf[:2]
        i = self.buf.find(b"\r\n\r\n")
        if i < 0:
            if len(self.buf) > self.max_head:
                raise BadFraming("431 Request Header Fields Too Large", "request head too large")
            return None
        if i > self.max_head:
            raise BadFraming("431 Request Header Fields Too Large", "request head too large")
        raw = bytes(self.buf[:i])
        del self.buf[:i + 4]
        head = _parse_head(raw)
        self._body.clear()
        self._chunk_left = -1
        self._in_trailers = False
        return head

    # -- body ------------------------------------------------------------------------------------
    def next_body(self, head: RequestHead) -> bytes | None:
        if head.chunked:
            return self._chunked()
        n = head.content_length or 0
        if n > self.max_body:
            raise BadFraming("413 Content Too Large", "request body too large")
        if len(self.buf) < n:
            return None
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return body

    def _chunked(self) -> bytes | None:
        while True:
            if self._in_trailers:
                j = self.buf.find(b"\r\n")
                if j < 0:
                    if len(self.buf) > self.max_head:
                        raise BadFraming("431 Request Header Fields Too Large", "trailers too large")
                    return None
                line = bytes(self.buf[:j])
                del self.buf[:j + 2]
                if not line:
                    return bytes(self._body)
                name, sep, _ = line.partition(b":")
                if not sep or not _TOKEN.fullmatch(name):
                    raise BadFraming("400 Bad Request", "malformed trailer line")
                continue
            if self._chunk_left < 0:
                j = self.buf.find(b"\r\n")
                if j < 0:
                    if len(self.buf) > MAX_CHUNK_LINE:
                        raise BadFraming("400 Bad Request", "chunk size line too long")
                    return None
                line = bytes(self.buf[:j])
                del self.buf[:j + 2]
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not _HEX.fullmatch(size):
                    raise BadFraming("400 Bad Request", "bad chunk size")
                n = int(size, 16)
                if n == 0:
                    self._in_trailers = True
                    continue
                if len(self._body) + n > self.max_body:
                    raise BadFraming("413 Content Too Large", "request body too large")
                self._chunk_left = n
            if len(self.buf) < self._chunk_left + 2:
                return None
            n = self._chunk_left
            if self.buf[n:n + 2] != b"\r\n":
                raise BadFraming("400 Bad Request", "chunk data not followed by CRLF")
            self._body += self.buf[:n]
            del self.buf[:n + 2]
            self._chunk_left = -1


def _parse_head(raw: bytes) -> RequestHead:
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or \
            any(c <= 0x20 or c == 0x7f for c in parts[1]):
        raise BadFraming("400 Bad Request", "malformed request line")
    m = _VERSION.fullmatch(parts[2])
    if m is None:
        raise BadFraming("400 Bad Request", "malformed HTTP version")
    version = (int(m[1]), int(m[2]))
    if version[0] != 1:
        raise BadFraming("505 HTTP Version Not Supported", "only HTTP/1.x is served")
    headers: dict[str, str] = {}
    lengths: list[bytes] = []
    hosts = 0
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):      # also rejects obs-fold and "Name :"
            raise BadFraming("400 Bad Request", "malformed header line")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise BadFraming("400 Bad Request", "control character in a header value")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key == "content-length":
            lengths += [v.strip(b" \t") for v in value.split(b",")]
        if key == "host":
            hosts += 1
        headers[key] = headers[key] + ", " + text if key in headers else text
    if hosts > 1 or (version >= (1, 1) and hosts == 0):
        raise BadFraming("400 Bad Request", "an HTTP/1.1 request needs exactly one Host")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()}
    head = RequestHead(parts[0].decode("ascii"), parts[1].decode("latin-1"), version, headers,
                       raw, tokens=tokens)
    if "transfer-encoding" in headers:
        if lengths:
            raise BadFraming("400 Bad Request", "both Content-Length and Transfer-Encoding")
        if version < (1, 1):
            raise BadFraming("400 Bad Request", "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in headers["transfer-encoding"].split(",")]
        if codings[-1] != "chunked":
            raise BadFraming("400 Bad Request", "request body not chunked last")
        if codings != ["chunked"]:
            raise BadFraming("501 Not Implemented", "only the chunked transfer coding")
        head.chunked = True
    elif lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            raise BadFraming("400 Bad Request", "invalid or conflicting Content-Length")
        head.content_length = int(lengths[0])
    if version >= (1, 1):
        head.close_after = "close" in tokens
    else:
        head.close_after = "keep-alive" not in tokens
    return head


def response(status: str, ctype: str, payload: bytes, *, head_only: bool, close: bool,
             keep_alive_10: bool = False) -> bytes:
    """One response.  No Content-Length on 1xx/204/304 (RFC 9110 8.6); HEAD gets the
    length its GET would have but no body."""
    code = status[:3]
    lines = [f"HTTP/1.1 {status}"]
    if code not in ("204", "304") and not code.startswith("1"):
        lines.append(f"Content-Type: {ctype}")
        lines.append(f"Content-Length: {len(payload)}")
    else:
        payload = b""
    if close:
        lines.append("Connection: close")
    elif keep_alive_10:
        lines.append("Connection: keep-alive")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + payload
