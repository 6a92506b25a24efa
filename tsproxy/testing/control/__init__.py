"""A Tailscale-compatible test control server (TS2021 + HTTP/2), good enough for real Go nodes.

    from tsproxy.testing.control import TestControlServer
"""

from tsproxy.testing.control.registry import AuthKey, NodeRecord, Registry  # noqa: F401
from tsproxy.testing.control.server import TestControlServer  # noqa: F401
