"""tsproxy.sync.Node: the loop on a background thread, plain blocking calls, clean shutdown."""

import http.client
import threading
import time

import pytest

import tsproxy.sync
from tsproxy.errors import AuthRejected


def test_sync_node_socket_http_client_and_clean_exit(tailnet):
    threads = set(threading.enumerate())
    with tsproxy.sync.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key=tailnet.auth_key,
                           hostname="sync-a", timeout=60) as a, \
         tsproxy.sync.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key=tailnet.auth_key,
                           hostname="sync-b", timeout=60) as b:
        assert a.state == "Running" and a.addresses
        b.reverse(f"tcp:80:127.0.0.1:{_page_server()}")       # b's tailnet port 80 -> local page
        deadline = time.monotonic() + 30
        while not any(p["name"] == "sync-b" for p in a.peers()):   # a learns of b
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sock = a.socket("sync-b", 80)

        class Conn(http.client.HTTPConnection):
            def connect(self):
                self.sock = sock
        c = Conn("sync-b")
        c.request("GET", "/")
        assert c.getresponse().read() == b"page"
        c.close()
        assert a.status()["state"] == "Running"
        assert a.whois(b.addresses[0])["name"] == "sync-b"
    assert set(threading.enumerate()) - threads <= {t for t in threading.enumerate()
                                                     if t.name.startswith("page")}


def test_sync_start_failure_raises_and_stops_the_thread(tailnet):
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(AuthRejected):
        with tsproxy.sync.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key="tskey-auth-nope",
                               hostname="sync-bad", timeout=30):
            pass
    assert "tsproxy-node" not in {t.name for t in threading.enumerate()} - before


def _page_server() -> int:
    import http.server

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"page")

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, name="page", daemon=True).start()
    return srv.server_address[1]
