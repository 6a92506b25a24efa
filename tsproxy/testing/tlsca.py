"""A throwaway certificate authority for one test tailnet run.

    ca = TestCA()                                   # new EC P-256 CA key, in memory only
    ca.write(dir)  -> ca_file                       # the CA certificate (PEM, public)
    ctx = ca.server_context(["127.0.0.1", "localhost"])   # leaf signed for those names/IPs

The control server and each DERP relay present a leaf certificate signed by the CA; clients
verify it against `ca_file` (tsproxy's --control-ca-file, SSL_CERT_FILE for Go and curl) as
they would a public CA.  Private keys never leave memory except for the instant
ssl.SSLContext.load_cert_chain needs a file: a 0600 file in a 0700 temporary directory,
deleted right after.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=7)
CLOCK_SKEW = datetime.timedelta(hours=1)


def _san(names) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):               # keep order, drop duplicates
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n.strip("[]"))))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def default_names(host: str) -> list[str]:
    """SANs for a server listening on `host`: the host itself plus the loopback names (a
    wildcard listen address is reached through loopback)."""
    return [host, "localhost", "127.0.0.1", "::1"]


class TestCA:
    __test__ = False

    def __init__(self, name: str = "tsproxy test CA"):
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                               x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tsproxy tests")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self._key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + VALIDITY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=True, key_cert_sign=True, crl_sign=True,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False), critical=True)
                     .add_extension(ski, critical=False)
                     .sign(self._key, hashes.SHA256()))
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.ca_file: str | None = None

    def write(self, directory: str, name: str = "ca.pem") -> str:
        """Write the CA certificate (public) into `directory`; returns and remembers the path."""
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(self.cert_pem)
        self.ca_file = path
        return path

    def issue(self, names) -> tuple[bytes, bytes]:
        """A leaf certificate for `names` (DNS names and IP literals) -> (cert PEM, key PEM).
        The CN is the first name, never 'derpkey...' (that would mean DERP fast start).  The
        root is not appended: servers do not send it, clients must already trust it."""
        names = list(names)
        if not names:
            raise ValueError("a certificate needs at least one name")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cn = names[0].strip("[]")
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + VALIDITY)
                .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()), critical=False)
                .sign(self._key, hashes.SHA256()))
        chain = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return chain, key_pem

    def server_context(self, names) -> ssl.SSLContext:
        """A TLS server context presenting a fresh leaf for `names`, HTTP/1.1 only (ALPN)."""
        chain, key_pem = self.issue(names)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        with tempfile.TemporaryDirectory(prefix="tsp-tls-") as d:    # 0700
            cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            with open(cert_path, "wb") as f:
                f.write(chain)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem)
            ctx.load_cert_chain(cert_path, key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this CA (for tests' own clients)."""
        ctx = ssl.create_default_context(cadata=self.cert_pem.decode())
        return ctx
