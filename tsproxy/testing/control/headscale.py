"""The Headscale profile of the test control server: `TestControlServer(profile="headscale")`.

Headscale cannot run here, so its behaviour lives in our server (PROTOCOL.md 2.1, 2.4, 3.6,
3.17; read in juanfont/headscale v0.26.0 hscontrol/noise.go, poll.go, auth.go, handlers.go,
derp/server/derp_server.go).  What the profile changes, and where Headscale does it:

  capability versions < 113    Noise upgrade: 101, then the connection closes (the early-write
                               hook fails before the corked handshake response is sent);
                               /machine/map: HTTP 400 before anything is applied;
                               /machine/register: processed first, then HTTP 400 (the order of
                               RegistrationHandler)
  GET /key                     400 without `v`, an empty 200 for v < 39, else the JSON keys
  DiscoKey, Endpoints,         taken from lite endpoint updates only (Stream: false), never
  Hostinfo                     from the streaming request (v0.23-v0.26 `handleEndpointUpdate`)
  a new disco key / Hostinfo   a full PeersChanged node (only endpoints and DERP are patched)
  zstd                         only when the request says Compress: "zstd"
  keep-alive                   50 s + a random 0-9 s chosen once per stream, the ticker reset
                               by every message sent (poll.go keepAliveInterval)
  Node                         both HomeDERP and the legacy DERP "127.3.3.40:<region>"
                               (v0.25-v0.28); self CapMap is-admin + ssh
  embedded DERP                region 999 "headscale", served on the control listener at /derp
                               (and /derp/probe, /derp/latency-check); published with HostName
                               "headscale" and DERPPort 0 (a docker-style config clients must
                               map to the control URL) or, with embedded_derp="server_url", as
                               GenerateRegion does: host and port of the server URL, no IPv4
  register                     `Ephemeral` in the request ignored (only the key makes a node
                               ephemeral); OldNodeKey never read (an expired node logs in again)
"""

from __future__ import annotations

MIN_CAP_VERSION = 113                  # hscontrol/capver MinSupportedCapabilityVersion
NOISE_CAP_VERSION = 39                 # /key answers JSON from this version on
KEEPALIVE = 50.0
KEEPALIVE_JITTER = 9.0
REGION_ID = 999
REGION_CODE = "headscale"
REGION_NAME = "Headscale Embedded DERP"


def unsupported(version) -> bytes:
    return f"unsupported client version: capability version {version}\n".encode()


def embedded_region(*, host: str, port: int, stun_port: int | None, style: str) -> dict:
    """The embedded DERP region as Headscale publishes it (see the module docstring)."""
    if style == "headscale":
        host_name, derp_port = "headscale", 0
    elif style == "server_url":
        host_name, derp_port = host, port
    else:
        raise ValueError(f"embedded_derp must be 'headscale' or 'server_url', not {style!r}")
    node = {"Name": str(REGION_ID), "RegionID": REGION_ID, "HostName": host_name,
            "DERPPort": derp_port, "IPv4": "", "IPv6": "",
            "STUNPort": stun_port if stun_port is not None else -1}
    return {"RegionID": REGION_ID, "RegionCode": REGION_CODE, "RegionName": REGION_NAME,
            "Nodes": [node]}
