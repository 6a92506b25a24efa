"""Settings for `tsproxy up`: flags > environment > config file > defaults (UX.md).

The config file is TOML (`--config`, else `$XDG_CONFIG_HOME/tsproxy/config.toml` when it
exists) with one key per flag (`wg-config = "wg0.conf"`, `forward = ["16579:peer-a:22"]`).
Environment variables are `TSPROXY_<FLAG>` (`TSPROXY_LISTEN`, `TSPROXY_WG_CONFIG`, ...) and
`TS_AUTHKEY`.  Every bad value is a ConfigError naming where it came from.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields

from tsproxy.errors import ConfigError

NON_TAILNET_POLICIES = ("direct", "refuse", "exit-node")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


DEFAULT_LOGIN_SERVER = "https://controlplane.tailscale.com"


@dataclass
class UpOptions:
    wg_config: str | None = None
    login_server: str | None = None
    control_ca_file: str | None = None      # a private CA (PEM) for control and DERP TLS
    auth_key: str | None = field(default=None, repr=False)   # a secret: never in reprs
    hostname: str | None = None
    ephemeral: bool = False
    advertise_tags: list[str] = field(default_factory=list)
    port: str | None = None
    state_dir: str | None = None
    listen: str | None = "127.0.0.1:1055"
    socks5: list[str] = field(default_factory=list)
    http_proxy: list[str] = field(default_factory=list)
    proxy_user: str | None = None
    proxy_password_file: str | None = None
    allow_public_without_auth: bool = False
    forward: list[str] = field(default_factory=list)
    reverse: list[str] = field(default_factory=list)
    non_tailnet: str = "direct"
    exit_node: str | None = None            # NAME|IP of a peer offering 0.0.0.0/0 and ::/0
    exit_node_allow_lan_access: bool = False
    accept_routes: bool = False
    foreground: bool = False
    log_level: str = "info"
    log_format: str = "text"
    metrics: str | None = None
    config: str | None = None

    def flag_names(self):
        return [f.name for f in fields(self)]


LIST_KEYS = {"socks5", "http_proxy", "forward", "reverse", "advertise_tags"}
BOOL_KEYS = {"allow_public_without_auth", "foreground", "ephemeral", "exit_node_allow_lan_access",
             "accept_routes"}
FILE_ONLY_EXCLUDED = {"config", "foreground"}


def default_config_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "tsproxy", "config.toml")


def merge(flags: dict, environ: dict[str, str] | None = None) -> UpOptions:
    """Build UpOptions from parsed flags (None = not given) over env, file and defaults."""
    environ = os.environ if environ is None else environ
    opts = UpOptions()
    sources: dict[str, str] = {}          # key -> where its value came from, for errors
    opts._sources = sources
    config_path = flags.get("config") or environ.get("TSPROXY_CONFIG")
    explicit = config_path is not None
    config_path = config_path or default_config_path()
    if explicit or os.path.exists(config_path):
        for key, (value, where) in _load_toml(config_path, explicit).items():
            setattr(opts, key, value)
            sources[key] = where
        opts.config = config_path
    for f in fields(UpOptions):
        if f.name in FILE_ONLY_EXCLUDED:
            continue
        env_name = "TSPROXY_" + f.name.upper()
        if env_name in environ:
            setattr(opts, f.name, _from_env(f.name, environ[env_name], env_name))
            sources[f.name] = env_name
    if "TS_AUTHKEY" in environ and "TSPROXY_AUTH_KEY" not in environ:
        opts.auth_key = environ["TS_AUTHKEY"]
        sources["auth_key"] = "TS_AUTHKEY"
    for key, value in flags.items():
        if value is None or key not in {f.name for f in fields(UpOptions)}:
            continue
        if key in LIST_KEYS and value == []:
            continue
        if key in BOOL_KEYS and value is False:
            continue
        setattr(opts, key, value)
        sources.pop(key, None)
    validate(opts)
    return opts


def source_of(opts: UpOptions, key: str) -> str:
    """How to name a setting in an error: `--listen`, `TSPROXY_LISTEN` or
    `config.toml line 3: listen`, after where its value came from."""
    return getattr(opts, "_sources", {}).get(key) or "--" + key.replace("_", "-")


def _toml_line(text: str, raw_key: str) -> int | None:
    import re
    pat = re.compile(r'^\s*(?:"?' + re.escape(raw_key) + r'"?)\s*=')
    for n, line in enumerate(text.splitlines(), 1):
        if pat.match(line):
            return n
    return None


def _load_toml(path: str, explicit: bool) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("config file not found", path=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file ({e.strerror})", path=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML ({e})", path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("invalid TOML (not UTF-8 text)", path=path) from None
    except RecursionError:
        raise ConfigError("invalid TOML (nested too deeply)", path=path) from None
    text = raw.decode("utf-8")
    known = {f.name: f for f in fields(UpOptions)}
    out = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in known or key in FILE_ONLY_EXCLUDED:
            raise ConfigError("unknown setting", path=path, key=raw_key)
        if key in LIST_KEYS:
            if isinstance(value, str):
                value = [value]
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError("expected a string or a list of strings", path=path, key=raw_key)
        elif key in BOOL_KEYS:
            if not isinstance(value, bool):
                raise ConfigError("expected true or false", path=path, key=raw_key)
        elif not isinstance(value, str):
            raise ConfigError("expected a string", path=path, key=raw_key)
        line = _toml_line(text, raw_key)
        out[key] = (value, f"{path}{f' line {line}' if line else ''}: {raw_key}")
    return out


def _from_env(key: str, value: str, env_name: str):
    if key in LIST_KEYS:
        return [v.strip() for v in value.split(",") if v.strip()]
    if key in BOOL_KEYS:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{env_name}: expected true or false, got {value!r}")
    return value


def validate(opts: UpOptions) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        src = source_of(opts, key)       # "--port must be ...", "TSPROXY_PORT: must be ..."
        return ConfigError(f"{src} {msg}" if src.startswith("--") else f"{src}: {msg}")

    if opts.non_tailnet not in NON_TAILNET_POLICIES:
        raise bad("non_tailnet", f"must be one of {', '.join(NON_TAILNET_POLICIES)}, not {opts.non_tailnet!r}")
    if opts.log_level.lower() not in LOG_LEVELS:
        raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {opts.log_level!r}")
    if opts.log_format not in LOG_FORMATS:
        raise bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}, not {opts.log_format!r}")
    if opts.metrics is not None and opts.metrics.lower() in ("", "off", "none"):
        opts.metrics = None
    if opts.metrics is not None:
        try:
            parse_listen_addr(opts.metrics)
        except ConfigError as e:
            raise bad("metrics", str(e)) from None
    if opts.listen is not None and opts.listen.lower() in ("", "off", "none"):
        opts.listen = None
    for key in ("listen", "socks5", "http_proxy"):
        value = getattr(opts, key)
        for addr in [value] if isinstance(value, str) else (value or []):
            try:
                parse_listen_addr(addr)
            except ConfigError as e:
                raise bad(key, str(e)) from None
    if (opts.proxy_user is None) != (opts.proxy_password_file is None):
        raise ConfigError("--proxy-user and --proxy-password-file go together")
    if opts.exit_node is not None:
        opts.exit_node = opts.exit_node.strip() or None      # "" = none (as `tsproxy set`)
    if opts.exit_node is not None:
        check_exit_node(opts.exit_node, source_of(opts, "exit_node"))
    tailnet_flags = [name for name in ("login_server", "auth_key", "hostname", "advertise_tags",
                                       "control_ca_file", "exit_node")
                     if getattr(opts, name)] + (["ephemeral"] if opts.ephemeral else []) \
        + (["accept_routes"] if opts.accept_routes else [])
    if opts.wg_config is not None and opts.non_tailnet == "exit-node":
        raise ConfigError(f"{source_of(opts, 'non_tailnet')} exit-node needs Tailscale mode; "
                          "plain WireGuard has no exit nodes (use direct or refuse)")
    if opts.wg_config is not None and tailnet_flags:
        raise ConfigError(f"{source_of(opts, 'wg_config')} (plain WireGuard) cannot be combined with "
                          f"{source_of(opts, tailnet_flags[0])} (Tailscale mode)")
    if opts.wg_config is None:
        opts.login_server = (opts.login_server or DEFAULT_LOGIN_SERVER).rstrip("/")
        if not opts.login_server.startswith(("http://", "https://")):
            raise bad("login_server", f"must be an http:// or https:// URL, not {opts.login_server!r}")
    for tag in opts.advertise_tags:
        if not tag.startswith("tag:") or len(tag) < 5:
            raise bad("advertise_tags", f"{tag!r} is not a tag (tag:NAME)")
    if opts.port is not None and (not (str(opts.port).isascii() and str(opts.port).isdigit())
                                  or not 0 <= int(opts.port) <= 65535):
        raise bad("port", f"must be 0..65535, not {opts.port!r}")


def check_exit_node(value: str, source: str = "--exit-node") -> str:
    """NAME, FQDN, IP address or StableID of a peer; the netmap decides whether it exists."""
    import re
    v = value.strip()
    if len(v) > 253 or not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+", v):
        raise ConfigError(f"{source} {value!r} is not a node name or IP address")
    return v


def check_forward(spec, allow_public: bool, source: str = "forward",
                  allow_flag: str = "--allow-public") -> None:
    """A forward listens without any authentication: loopback unless the user insists, and on
    a real port (0 would pick one nobody can know)."""
    if spec.listen_port == 0:
        raise ConfigError(f"{source} {spec.text!r}: listen port 0 is not allowed; pick a port 1-65535")
    if not allow_public and not is_loopback(spec.listen_host):
        raise ConfigError(f"{source} {spec.text!r}: refusing to listen on {spec.listen_host} (not loopback):"
                          f" a forward has no authentication; pass {allow_flag} if you mean it")


def parse_listen_addr(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT` (loopback) -> (host, port)."""
    t = text.strip()
    if t.isascii() and t.isdigit():
        host, port = "127.0.0.1", t
    elif t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"listen address {text!r}: expected [ADDR]:PORT")
        port = rest[1:]
    else:
        host, sep, port = t.rpartition(":")
        if not sep:
            raise ConfigError(f"listen address {text!r}: expected HOST:PORT")
        host = host or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"listen address {text!r}: host must be an IP address or localhost") from None
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen address {text!r}: port must be 0..65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    return ipaddress.ip_address(host).is_loopback
