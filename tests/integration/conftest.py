"""Fixtures most loopback integration modules share: a test tailnet (control server + DERP relay
on 127.0.0.1, one per module) and a page server for reverse forwards.  A module that needs
another shape (more regions, short ephemeral timeout) defines its own fixture of the same name."""

import pytest

from tests.tailnet_helpers import start_page_server


@pytest.fixture(scope="module")
def tailnet():
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host="127.0.0.1") as net:
        yield net


@pytest.fixture(scope="module")
def web():
    """Port of a loopback page server (tests.tailnet_helpers.PageHandler)."""
    srv = start_page_server()
    yield srv.server_address[1]
    srv.shutdown()
