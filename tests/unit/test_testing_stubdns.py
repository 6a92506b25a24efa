"""The stub resolver test daemons use: it logs each query and answers REFUSED."""

import os
import socket
import struct
import subprocess
import sys

import pytest

from tsproxy.testing.stubdns import StubResolver, parse_question, refused

QUERY = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
         b"\x07example\x03com\x00\x00\x1c\x00\x01")


def test_refused_keeps_id_question_and_rd():
    r = refused(QUERY)
    assert r[:2] == b"\x12\x34"
    flags, qd, an, ns, ar = struct.unpack("!HHHHH", r[2:12])
    assert flags == 0x8105 and (qd, an, ns, ar) == (1, 0, 0, 0)
    assert r[12:] == QUERY[12:]
    assert parse_question(QUERY) == ("example.com", 28)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 12, QUERY[:20], QUERY[:12] + b"\xc0\x0c\x00\x01\x00\x01"])
def test_malformed_queries_get_a_reply_without_question(bad):
    with pytest.raises(ValueError):
        parse_question(bad)
    if len(bad) >= 4:
        assert struct.unpack("!H", refused(bad)[4:6])[0] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="port 53 and a mount namespace need root")
def test_wrapped_process_asks_only_the_stub():
    with StubResolver() as stub:
        code = ("import socket\ntry:\n socket.getaddrinfo('leak-check.example', 80)\n"
                "except socket.gaierror as e:\n print('gaierror')")
        out = subprocess.run(stub.wrap([sys.executable, "-c", code]), capture_output=True,
                             text=True, timeout=30).stdout
        assert out.strip() == "gaierror"
        assert "leak-check.example" in stub.names()
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(5)
        c.sendto(QUERY, (stub.host, 53))
        assert c.recv(512) == refused(QUERY)
        c.close()
