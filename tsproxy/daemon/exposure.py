"""Who can reach what we listen on: loopback by default; a non-loopback listener with no
credential in front of it (a proxy without --proxy-user, or any forward: forwards never
authenticate) is refused unless the user passed --allow-public-without-auth."""

from __future__ import annotations

from tsproxy.daemon import options
from tsproxy.errors import ConfigError


def check_proxy_listener(host: str, port: int, *, authed: bool, allow_public: bool) -> None:
    if authed or allow_public or options.is_loopback(host):
        return
    raise ConfigError(f"refusing to serve an open proxy on {host}:{port}: set --proxy-user and "
                      "--proxy-password-file, or pass --allow-public-without-auth if you mean it")


def check_forward(spec, *, allow_public: bool) -> None:
    """Forwards have no authentication, so proxy credentials do not make them safe to expose."""
    if allow_public or options.is_loopback(spec.listen_host):
        return
    raise ConfigError(f"refusing to open forward {spec.text!r} on {spec.listen_host}: anyone who can "
                      "reach that address would get into the tailnet (forwards have no "
                      "authentication); bind it to 127.0.0.1, or pass --allow-public-without-auth "
                      "if you mean it")
