"""TLS client trust for the control and DERP connections: every client context is built here.

    trust = Trust()                         # the system roots; OpenSSL honours SSL_CERT_FILE
                                            # and SSL_CERT_DIR (they replace the system store)
    trust = Trust(ca_file="/etc/hs-ca.pem") # the same plus a private CA (--control-ca-file)
    ctx = trust.context()                   # verified, hostname/IP checked; built once, shared
    unverified_context()                    # DERP InsecureForTests / sha256 pins (caller checks)
    verify_failure("control server", host, port, exc) -> CertificateVerifyFailed | None

A verification failure becomes one line naming the server and OpenSSL's reason, e.g.
"control server 127.0.0.1:4431: certificate verify failed: unable to get local issuer
certificate"; callers stop retrying fast on it (a wrong CA does not fix itself).
"""

from __future__ import annotations

import ssl

from tsproxy.errors import ConfigError, TsproxyError


class CertificateVerifyFailed(TsproxyError):
    """The server's certificate did not verify against the trusted roots; str() is the line."""


class Trust:
    def __init__(self, ca_file: str | None = None):
        self.ca_file = ca_file
        self._ctx: ssl.SSLContext | None = None
        if ca_file is not None:
            self.context()             # a bad file is a ConfigError now, not at the first dial

    def context(self) -> ssl.SSLContext:
        if self._ctx is None:
            ctx = ssl.create_default_context()      # system roots (SSL_CERT_FILE/_DIR), verified
            if self.ca_file is not None:
                try:
                    ctx.load_verify_locations(cafile=self.ca_file)
                except FileNotFoundError:
                    raise ConfigError("--control-ca-file: no such file", path=self.ca_file) from None
                except ssl.SSLError:                # (an OSError too: test it first)
                    raise ConfigError("--control-ca-file: not a PEM certificate file",
                                      path=self.ca_file) from None
                except OSError as e:
                    raise ConfigError(f"--control-ca-file: cannot read it ({e.strerror})",
                                      path=self.ca_file) from None
            self._ctx = ctx
        return self._ctx

    def __repr__(self) -> str:
        return f"Trust(ca_file={self.ca_file!r})"


DEFAULT = None          # lazily: Trust() with the system roots


def default_trust() -> Trust:
    global DEFAULT
    if DEFAULT is None:
        DEFAULT = Trust()
    return DEFAULT


def unverified_context() -> ssl.SSLContext:
    """No chain or name check: only for DERP nodes marked InsecureForTests or pinned by the
    leaf's SHA-256 (which the caller then compares)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verify_failure(what: str, host: str, port: int, exc: BaseException):
    """CertificateVerifyFailed for a certificate verification error, None for anything else."""
    if not isinstance(exc, ssl.SSLCertVerificationError):
        return None
    reason = (exc.verify_message or exc.reason or "unknown reason").rstrip(".")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return CertificateVerifyFailed(f"{what} {where}: certificate verify failed: {reason}")
