"""Command line entry point (filled in by the daemon work)."""

import sys


def main(argv=None) -> int:
    print("tsproxy: not yet usable", file=sys.stderr)
    return 1
