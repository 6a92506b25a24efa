"""Client trust (tsproxy/tlsconfig) against the test CA, over loopback: the control client and
a DERP connection verify CA-signed servers; a failed verification is one line naming the server
and OpenSSL's reason; the control client stops at it before its first session and retries
at its slowest pace after one; DERP logs it once, not once per retry."""

import asyncio
import logging
import ssl

import pytest

from tsproxy.control.aio import ControlClient
from tsproxy.daemon.state import StateStore
from tsproxy.derp import aio as derp_aio
from tsproxy.derp.aio import DerpConnection
from tsproxy.errors import ConfigError
from tsproxy.keys import NodePrivate
from tsproxy.testing.control import TestControlServer
from tsproxy.testing.derp_server import TestDerpServer, derp_map
from tsproxy.testing.tlsca import TestCA
from tsproxy.tlsconfig.aio import CertificateVerifyFailed, Trust, verify_failure
from tests.waiting import until

pytestmark = [pytest.mark.timeout(60)]


def test_trust_adds_the_ca_file_to_the_system_roots(tmp_path):
    ca = TestCA()
    t = Trust(ca.write(str(tmp_path)))
    subjects = [dict(rdn[0] for rdn in c["subject"]) for c in t.context().get_ca_certs()]
    assert {"commonName": "tsproxy test CA", "organizationName": "tsproxy tests"} in subjects
    assert t.context() is t.context()                 # built once, shared by every dial
    assert t.context().verify_mode == ssl.CERT_REQUIRED and t.context().check_hostname
    with pytest.raises(ConfigError, match="no such file"):
        Trust(str(tmp_path / "nope.pem"))


@pytest.mark.asyncio
async def test_ssl_cert_dir_is_honoured(tmp_path, monkeypatch):
    """What the user trusts through OpenSSL's SSL_CERT_DIR (a hashed directory) is trusted."""
    import shutil
    import subprocess
    ca = TestCA()
    d = tmp_path / "certs"
    d.mkdir()
    h = subprocess.run([shutil.which("openssl") or "openssl", "x509", "-subject_hash",
                        "-noout"], input=ca.cert_pem, capture_output=True, check=True)
    (d / f"{h.stdout.decode().strip()}.0").write_bytes(ca.cert_pem)
    srv = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                     ssl=ca.server_context(["127.0.0.1"]))
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", port, ssl=Trust().context(),
                                          server_hostname="127.0.0.1")
        monkeypatch.setenv("SSL_CERT_DIR", str(d))
        _, w = await asyncio.open_connection("127.0.0.1", port, ssl=Trust().context(),
                                             server_hostname="127.0.0.1")
        w.close()
    finally:
        srv.close()


def test_verify_failure_line():
    e = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    e.verify_message = "Hostname mismatch, certificate is not valid for 'x'."
    assert str(verify_failure("DERP server", "::1", 443, e)) == (
        "DERP server [::1]:443: certificate verify failed: Hostname mismatch, certificate is "
        "not valid for 'x'")
    assert verify_failure("control server", "h", 1, ConnectionResetError()) is None


@pytest.mark.asyncio
async def test_leaf_is_checked_for_the_address(tmp_path):
    """A certificate the CA signed for other names is refused (IP SAN checked)."""
    ca = TestCA()
    t = Trust(ca.write(str(tmp_path)))
    srv = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                     ssl=ca.server_context(["example.test", "10.9.9.9"]))
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ssl.SSLCertVerificationError) as exc:
            await asyncio.open_connection("127.0.0.1", port, ssl=t.context(),
                                          server_hostname="127.0.0.1")
        assert "IP address mismatch" in str(verify_failure("x", "127.0.0.1", port, exc.value))
    finally:
        srv.close()


@pytest.mark.asyncio
async def test_control_registers_then_retries_slowly_after_a_certificate_change(tmp_path):
    ca = TestCA()
    srv = TestControlServer("127.0.0.1", tls=ca)
    await srv.start()
    key = srv.create_auth_key(reusable=True).key
    c = ControlClient(srv.url, StateStore(str(tmp_path / "st")), hostname="tls-ctl",
                      auth_key=key, trust=Trust(ca.write(str(tmp_path))))
    c.backoff_min, c.backoff_max = 0.05, 0.2
    task = asyncio.create_task(c.run())
    try:
        await until(lambda: c.state == "Running", what="running over https")
        assert srv.node("tls-ctl").online
        srv._ssl_ctx = TestCA("another CA").server_context(["127.0.0.1"])   # re-keyed server
        await srv.restart()
        await until(lambda: c.failures >= 2, what="verification failures")
        assert not task.done()            # had a session: keeps trying, at backoff_max
        assert c.last_error == (f"control server 127.0.0.1:{srv.port}: certificate verify "
                                "failed: unable to get local issuer certificate")
        assert c.netmap is not None       # the last good netmap stays
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await srv.stop()


@pytest.mark.asyncio
async def test_control_stops_at_the_first_failure_before_any_session(tmp_path):
    srv = TestControlServer("127.0.0.1", tls=TestCA())
    await srv.start()
    c = ControlClient(srv.url, StateStore(str(tmp_path / "st")), hostname="tls-ctl",
                      auth_key="tskey-x")          # default trust: system roots only
    try:
        with pytest.raises(CertificateVerifyFailed, match="unable to get local issuer"):
            async with asyncio.timeout(10):
                await c.run()
        assert c.failures == 1 and srv.counters["http_requests"] == 0
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_derp_verified_against_the_ca_and_refused_without_it(tmp_path, monkeypatch, caplog):
    ca = TestCA()
    srv = TestDerpServer(tls=True, ca=ca)
    await srv.start()
    node = derp_map(srv)["Regions"]["900"]["Nodes"][0]
    assert "InsecureForTests" not in node and node["HostName"] == "127.0.0.1"
    good = DerpConnection(node, NodePrivate.generate(), on_packet=lambda s, d: None,
                          trust=Trust(ca.write(str(tmp_path))))
    monkeypatch.setattr(derp_aio, "VERIFY_FAILED_BACKOFF", 0.05)   # watch several retries
    bad = DerpConnection(node, NodePrivate.generate(), on_packet=lambda s, d: None)
    tasks = [asyncio.create_task(good.run()), asyncio.create_task(bad.run())]
    try:
        with caplog.at_level(logging.WARNING, logger="tsproxy.derp.aio"):
            await asyncio.wait_for(good.connected.wait(), 10)
            await until(lambda: bad.counters["tls_verify_failed"] >= 3, what="retries")
        assert not bad.connected.is_set() and bad.counters["connects"] == 0
        line = (f"DERP server 127.0.0.1:{srv.port}: certificate verify failed: "
                "unable to get local issuer certificate")
        assert bad.last_error == line and good.last_error == ""
        assert [r.getMessage() for r in caplog.records] == [line]      # once, not per retry
    finally:
        for conn in (good, bad):
            await conn.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.stop()
