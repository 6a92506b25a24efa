"""tsproxy: a rootless userspace tailnet / WireGuard proxy with its own TCP/IP stack.

Nothing is imported eagerly here: every submodule import runs this file, and the
sans-IO cores must stay free of the daemon's dependencies.  `tsproxy.Node` (the Python API,
docs/python-api.md) is loaded on first use.
"""

from tsproxy.version import __version__  # noqa: F401

__all__ = ["Node", "__version__"]


def __getattr__(name):
    if name == "Node":
        from tsproxy.node import Node
        return Node
    raise AttributeError(f"module 'tsproxy' has no attribute {name!r}")
