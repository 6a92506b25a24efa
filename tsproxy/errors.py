"""Exception hierarchy shared by every package.

TsproxyError
├── ProtocolError              a peer spoke the protocol wrongly
│   ├── LocalProtocolError     we were asked to do something the protocol forbids
│   └── RemoteProtocolError    the other side sent something invalid (close that connection)
├── ConfigError                bad user input: config file, flag, forward spec (one clear line)
└── DialError                  a connection through the tunnel could not be made
    ├── ConnectionRefused      RST or ICMP port unreachable
    ├── HostUnreachable        ICMP host/net unreachable, no route, no peer
    ├── NetworkUnreachable     no route at all for the destination
    ├── DialTimeout            no answer in time
    └── NotAllowed             refused by policy (non-tailnet refuse, packet filter)
NodeStartError                 why `Node.wait_running()` did not reach Running (tsproxy.Node)
├── NeedsLogin                 interactive login needed: open .url (the node keeps trying)
├── AuthRejected               the control server refused the auth key (not retried)
│   └── KeyExpired             ... because the key has expired
├── ControlUnreachable         no attempt reached the control server yet (the node keeps trying)
└── Timeout                    not Running within the timeout (also a TimeoutError)

Packet paths never raise on bad input: they drop and count (see DESIGN.md section 5).
"""


class TsproxyError(Exception):
    """Base of every error tsproxy raises on purpose."""


class ProtocolError(TsproxyError):
    pass


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass


class ConfigError(TsproxyError):
    """A user-facing configuration problem; str() is the one line shown to the user."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.path = path
        self.line = line
        self.key = key
        where = ""
        if path is not None:
            where = path if line is None else f"{path}:{line}"
            where += ": "
        if key is not None:
            message = f"{key}: {message}"
        super().__init__(where + message)


class DialError(TsproxyError):
    """Base for failures to open a connection through the tunnel."""


class ConnectionRefused(DialError):
    pass


class HostUnreachable(DialError):
    pass


class NetworkUnreachable(DialError):
    pass


class DialTimeout(DialError):
    pass


class NotAllowed(DialError):
    pass


class NodeStartError(TsproxyError):
    """Base of the outcomes of `Node.wait_running()` other than Running."""


class NeedsLogin(NodeStartError):
    """The control server wants an interactive login; the node keeps polling until it is done."""

    def __init__(self, url: str):
        self.url = url
        super().__init__(f"log in by opening {url}")


class AuthRejected(NodeStartError):
    pass


class KeyExpired(AuthRejected):
    pass


class ControlUnreachable(NodeStartError):
    pass


class Timeout(NodeStartError, TimeoutError):
    pass
