"""tsproxy: a rootless userspace tailnet / WireGuard proxy with its own TCP/IP stack.

Nothing is imported eagerly here: every submodule import runs this file, and the
sans-IO cores must stay free of the daemon's dependencies.
"""

from tsproxy.version import __version__  # noqa: F401
