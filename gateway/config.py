"""The configuration file: its schema (the reference for every key) and loading.

One TOML file. :func:`load` returns a frozen :class:`Config` or raises
:class:`ConfigError` listing every problem with its key path, e.g.
``cluster.api.endpoints[1]: not an address: "127.0.0.1"``. Durations are
strings like "30s" or "500ms"; sizes are strings like "64KiB".

The schemas below are the documentation of each key (see also
``examples/gateway.toml``, which shows every key with a comment).

Longer than ~600 lines on purpose: a key lives in three places that are read
and changed together (its section's schema table, the field of the frozen
value, and the checks across sections in :func:`from_dict`), and the table is
what scripts/gen-config-docs.py turns into docs/configuration.md. Split into a
schema module and a loading module, every new key would touch both.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway import schema as s
from gateway.identity import IdentityError, resolve_identity
from gateway.redact import redact_text
from gateway.schema import Field, Invalid, IPNetwork

# --- the schema of each section ---------------------------------------------

BUFFER_MIN = 1024
"""Smallest ``[gateway] buffer_size``. 0 reads nothing, which the relay takes for
EOF: every connection would close at once; below 1 KiB each byte costs a syscall
pair for little more than its headers."""
BUFFER_MAX = 64 << 20
"""Largest ``[gateway] buffer_size``. One recv never returns more than the socket
receive buffer holds (Linux's tcp_rmem maximum is 6 MiB by default), so more buys
nothing, while a congested direction may hold this much per flow: 64 GiB (a unit
typo) must be refused by ``l4gw check``, not die in a MemoryError at start."""
PEEK_MIN = 64
"""Smallest ``peek_max``: the shortest ClientHello that can carry a server name
(record and handshake headers, the fixed fields, one cipher suite, an SNI
extension) is 62 bytes. 0 peeks nothing and fails every peek."""
PEEK_MAX = 64 << 10
"""Largest ``peek_max``: a peek waits (SO_RCVLOWAT) for bytes that must fit in the
socket's receive buffer, 128 KiB by default, and the kernel caps the low-water
mark at half of it; a larger cap could never be reached."""
ADMIN_MAX_CONNECTIONS = 16
"""Default ``[admin] max_connections``: probes and scrapes are a few at a time."""

GATEWAY = {
    "drain_timeout": Field(s.duration, 30.0, "SIGTERM: how long open connections may finish"),
    "buffer_size": Field(
        s.size_in(BUFFER_MIN, BUFFER_MAX),
        65536,
        "relay buffer per direction (the backpressure bound)",
    ),
    "admit_on_error": Field(
        s.choice("closed", "open"), "closed", "a plugin raising in admit: refuse or ignore it"
    ),
    "route_on_error": Field(
        s.choice("closed", "open"), "closed", "a plugin raising in route: refuse or ask the next"
    ),
    "log_connections": Field(s.boolean, False, "one log line per connection (the demo sets it)"),
    "log_level": Field(s.choice("debug", "info", "warning", "error"), "info", "log threshold"),
    "log_format": Field(
        s.choice("text", "json"),
        "text",
        'the gateway\'s own log on stderr: "text" lines, or one JSON object per line',
    ),
    "watch_config": Field(
        s.boolean,
        False,
        "reload when the config file is replaced or changed (checked every second), as SIGHUP does",
    ),
    "disable_plugins": Field(
        s.list_of(s.name),
        (),
        "installed plugins not to load, by name (their [plugin.NAME] sections are ignored)",
    ),
    "workers": Field(
        s.integer(1, 64),
        1,
        "processes sharing the TCP listeners (SO_REUSEPORT); UDP and admin run in the first",
    ),
    "user": Field(
        s.string,
        "",
        "run as this user (name or uid) once listeners, TPROXY and BPF are set up; "
        "empty: stay as started",
    ),
    "group": Field(s.string, "", "with user: run as this group (default: the user's own)"),
}

LISTENER = {
    "name": Field(s.name, doc="unique name, used by routes"),
    "bind": Field(
        s.address,
        doc='"a.b.c.d:port" or "[addr]:port"; port 0: any free port (the ready line says which)',
    ),
    "protocol": Field(s.choice("tcp", "udp"), "tcp", "transport"),
    "transparent": Field(s.boolean, False, "IP_TRANSPARENT: receive TPROXY'd traffic"),
    "max_connections": Field(s.integer(1), 10000, "concurrent connections cap"),
    "on_max_connections": Field(
        s.choice("wait", "refuse"),
        "wait",
        "at the cap: leave new ones in the kernel backlog, or accept and reset them",
    ),
    "backlog": Field(s.integer(1, 65535), 4096, "listen(2) backlog"),
    "peek_timeout": Field(
        s.positive_duration, 1.0, "how long to wait for a TLS ClientHello or a PROXY header"
    ),
    "peek_max": Field(s.size_in(PEEK_MIN, PEEK_MAX), 16389, "most bytes peeked for a ClientHello"),
    "proxy_protocol": Field(
        s.boolean, False, "expect a PROXY v1/v2 header (needs proxy_protocol_trusted)"
    ),
    "proxy_protocol_trusted": Field(
        s.list_of(s.network), (), "CIDRs allowed to send a PROXY header"
    ),
    "session_idle_timeout": Field(
        s.positive_duration, 30.0, "UDP: a session ends after this idle time"
    ),
    "max_sessions": Field(s.integer(1), 10000, "UDP: concurrent sessions cap"),
}

ROUTE_SPLIT = {
    "cluster": Field(s.name, doc="cluster name"),
    "weight": Field(s.integer(0, 1_000_000), 1, "share of new connections"),
}

ROUTE = {
    "name": Field(s.name, "", "defaults to route<index>"),
    "listener": Field(s.name, doc="the listener this route serves"),
    "cluster": Field(s.name, "", "target cluster (or use clusters = [...] for a split)"),
    "clusters": Field(s.list_of(s.table(ROUTE_SPLIT)), (), "weighted split across clusters"),
    "destination": Field(s.list_of(s.network), (), "original destination CIDRs"),
    "ports": Field(s.list_of(s.port), (), "original destination ports"),
    "sni": Field(s.list_of(s.hostname_pattern), (), 'TLS SNI, exact or "*.domain"'),
    "alpn": Field(
        s.list_of(s.alpn_protocol),
        (),
        'TLS ALPN: the client offers at least one of these (e.g. ["h2", "http/1.1"])',
    ),
    "source": Field(s.list_of(s.network), (), "client CIDRs"),
}

ENDPOINT_TABLE = {
    "address": Field(
        s.string, doc='"ip:port", "[ipv6]:port" or "name:port" (a DNS name, followed)'
    ),
    "weight": Field(
        s.integer(0, 1_000_000),
        1,
        "relative share; a name gives it to each of its addresses",
    ),
}

SRV_TABLE = {
    "srv": Field(
        s.string,
        doc="a DNS SRV name (_service._proto.domain): its targets, ports, priorities and weights",
    ),
}

HEALTH_CHECK = {
    "interval": Field(s.positive_duration, 5.0, "time between probes"),
    "timeout": Field(s.positive_duration, 1.0, "a probe slower than this fails"),
    "healthy_threshold": Field(s.integer(1), 2, "successes that mark an endpoint healthy"),
    "unhealthy_threshold": Field(s.integer(1), 2, "failures that mark it unhealthy"),
    "send": Field(s.string, "", "bytes to send after connect (TCP) or as the probe (UDP)"),
    "expect": Field(s.string, "", "the reply must start with this"),
}

OUTLIER = {
    "consecutive_failures": Field(s.integer(1), 5, "connect failures in a row that eject"),
    "ejection_time": Field(s.positive_duration, 30.0, "how long an ejected endpoint stays out"),
}


DNS_NAME_MAX = 253
"""Longest DNS name in text form (RFC 1035 section 2.3.4: 255 octets on the wire)."""
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def dns_name(value: Any) -> str:
    """A DNS name, checked for syntax only (never resolved), stored lower-case.

    RFC 1123 labels (letters, digits, inner hyphens, at most 63 characters, the
    whole at most 253), plus "_": SRV names need it (``_api._tcp``) and Docker
    Compose service names may hold it. The last label may not be all digits
    (RFC 1123 section 2.1), so a mistyped address ("10.0.0.300") is refused as one.
    """
    text = s.string(value).lower()
    body = text[:-1] if text.endswith(".") else text
    labels = body.split(".")
    if (
        not body
        or len(body) > DNS_NAME_MAX
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise Invalid(
            f'not a DNS name: "{value}" (labels of letters, digits and inner "-", '
            "at most 63 characters each)"
        )
    return text


def _address_or_name(text: str) -> tuple[str, int, bool]:
    """(host, port, is_name) of "ip:port", "[ipv6]:port" or "name:port"."""
    try:
        host, port = s.split_host_port(text)
        named = False
    except ValueError:
        head, sep, tail = text.rpartition(":")
        if not sep or text.startswith("[") or ":" in head:
            raise Invalid(
                f'not an address: "{text}" (expected "1.2.3.4:80", "[::1]:80" or "name:80")'
            ) from None
        try:
            host = dns_name(head)
        except Invalid:
            raise Invalid(
                f'not an address: "{text}" (expected "1.2.3.4:80", "[::1]:80" or "name:80"; '
                f'"{head}" is neither an IP address nor a DNS name)'
            ) from None
        if not tail.isdigit() or int(tail) > 65535 or (len(tail) > 1 and tail[0] == "0"):
            raise Invalid(f'not a port in "{text}": "{tail}"')
        port = int(tail)
        named = True
    if port == 0:
        # Port 0 is "any free port" to bind(2); to connect(2) it is no port at all.
        raise Invalid(f'port 0 in "{text}": a backend needs the port it listens on')
    return host, port, named


def endpoint_spec(value: Any) -> Endpoint | NamedEndpoint | SrvEndpoint:
    """One endpoint item: "ip:port", "[ipv6]:port", "name:port", a table with
    ``address`` (either form) and ``weight``, or ``{ srv = "..." }``.

    Raises:
        Invalid: naming the problem (and the sub key of a table).
    """
    if isinstance(value, str):
        host, port, named = _address_or_name(value)
        return NamedEndpoint(host, port, 1) if named else Endpoint(host, port, 1)
    if isinstance(value, Mapping):
        if "srv" in value:
            t = s.table(SRV_TABLE)(value)
            try:
                return SrvEndpoint(dns_name(t["srv"]))
            except Invalid as exc:
                raise Invalid(problems=[(".srv", str(exc))]) from None
        t = s.table(ENDPOINT_TABLE)(value)
        try:
            host, port, named = _address_or_name(t["address"])
        except Invalid as exc:
            raise Invalid(problems=[(".address", str(exc))]) from None
        if named:
            return NamedEndpoint(host, port, t["weight"])
        return Endpoint(host, port, t["weight"])
    raise Invalid(
        'expected "ip:port", "name:port", {address = "...", weight = N} or {srv = "..."}, '
        f"got {s.type_name(value)}"
    )


CLUSTER = {
    "endpoints": Field(
        s.list_of(endpoint_spec),
        (),
        'backends: "ip:port", "[ipv6]:port", "name:port" (followed in DNS), '
        '{ address = "...", weight = N } or { srv = "_svc._tcp.domain" }',
    ),
    "endpoints_file": Field(
        s.string,
        None,
        "a JSON list of the same endpoint forms, watched for changes (instead of endpoints; "
        "relative to this file's directory)",
    ),
    "discovery": Field(
        s.name,
        "",
        "a loaded plugin, by name, that publishes this cluster's endpoints (instead of endpoints)",
    ),
    "connect_timeout": Field(s.positive_duration, 2.0, "per connect attempt"),
    "idle_timeout": Field(s.duration, 300.0, "close a pair idle this long (0 = never)"),
    "connect_attempts": Field(s.integer(1, 100), 3, "endpoints tried per connection"),
    "connect_budget": Field(s.duration, 0.0, "total time for all attempts (0 = no limit)"),
    "balance": Field(
        s.choice("round_robin", "least_conn", "random_two", "maglev"),
        "round_robin",
        "how an endpoint is chosen",
    ),
    "on_no_healthy": Field(s.choice("refuse", "panic"), "refuse", "no healthy endpoint left"),
    "health_check": Field(s.table(HEALTH_CHECK), None, "active health checks (off if absent)"),
    "outlier": Field(s.table(OUTLIER), None, "passive ejection on connect failures"),
    "upstream_source": Field(
        s.choice("gateway", "client"), "gateway", "client: connect from the client's own IP"
    ),
    "proxy_protocol": Field(s.choice("none", "v1", "v2"), "none", "header sent to the backend"),
    "proxy_protocol_traceparent": Field(s.boolean, True, "v2: carry the W3C traceparent in a TLV"),
}

INTERCEPT = {
    "listener": Field(s.name, doc="a listener with transparent = true"),
    "interfaces": Field(s.list_of(s.string), (), "ingress interfaces (empty: any)"),
    "destination": Field(s.list_of(s.network, min_items=1), doc="intercepted destination CIDRs"),
    "ports": Field(s.list_of(s.port), (), "intercepted destination ports (empty: all)"),
    "protocol": Field(s.choice("tcp", "udp"), "tcp", "transport"),
}

TPROXY = {
    "manage": Field(s.boolean, False, "l4gw run sets up at start and tears down at exit"),
    "mark": Field(s.integer(1, 0xFFFFFFFF), 1, "fwmark for intercepted and return traffic"),
    "table": Field(s.integer(1, 0xFFFFFFFE), 100, "policy-routing table id"),
    "rule_priority": Field(s.integer(1, 32765), 10000, "priority of our ip rule"),
    "check_interval": Field(
        s.positive_duration,
        5.0,
        "manage: how often the gateway checks its rules are intact, and restores them if not",
    ),
    "intercept": Field(s.list_of(s.table(INTERCEPT)), (), "one per intercepted traffic class"),
}

TELEMETRY = {
    "exporter": Field(s.choice("none", "console", "otlp"), "none", "where spans and metrics go"),
    "sample_ratio": Field(s.number(0.0, 1.0), 1.0, "parent-based ratio sampler"),
    "service_name": Field(s.string, "l4gw", "unless OTEL_SERVICE_NAME is set"),
    "metrics_interval": Field(s.positive_duration, 10.0, "OTLP metric export interval"),
}

ADMIN = {
    "bind": Field(s.address, ("127.0.0.1", 9901), "admin HTTP endpoint (port 0: any free port)"),
    "token": Field(s.string, "", "bearer token required when set (and when bind is not loopback)"),
    "token_file": Field(
        s.secret_file(),
        None,
        "read token from this file instead (a mounted secret; one trailing newline is "
        "removed; read again on reload)",
    ),
    "insecure": Field(
        s.boolean,
        False,
        "allow a bind that is not loopback without a token (a warning is logged at start)",
    ),
    "max_connections": Field(
        s.integer(1, 1024),
        ADMIN_MAX_CONNECTIONS,
        "admin connections served at once; more wait in the kernel backlog",
    ),
}

DNS = {
    "servers": Field(
        s.list_of(s.string),
        (),
        'resolvers, "ip" or "ip:port" (port 53 by default); '
        "empty: the system's (/etc/resolv.conf)",
    ),
    "family": Field(s.choice("any", "ipv4", "ipv6"), "any", "which records a name resolves to"),
    "min_ttl": Field(s.positive_duration, 1.0, "a record's TTL is clamped into [min_ttl, max_ttl]"),
    "max_ttl": Field(s.positive_duration, 300.0, "longest time an answer is used unrefreshed"),
    "timeout": Field(s.positive_duration, 2.0, "per query"),
}

SHIELD = {
    "interfaces": Field(
        s.list_of(s.name),
        (),
        "where the eBPF shield drops listed clients' new connections "
        "(default: the interfaces of [[tproxy.intercept]]; else required)",
    ),
    "mode": Field(
        s.choice("auto", "xdp", "tc"),
        "auto",
        "auto: tc on veth, native XDP where the driver has it, else tc",
    ),
    "max_entries": Field(s.integer(1, 1 << 24), 65536, "most shielded clients and prefixes"),
    "never": Field(s.list_of(s.network), (), "CIDRs never shielded, beside the built-in ones"),
}

TOP_LEVEL = {
    "shield",
    "gateway",
    "listener",
    "route",
    "cluster",
    "tproxy",
    "telemetry",
    "admin",
    "plugin",
    "dns",
}


# --- the runtime values -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A backend address with its balancing weight.

    ``origin`` and ``source`` say where it came from and take no part in equality
    or hashing: state keyed by endpoint (health, least-conn counts) carries over
    when the same address arrives by another route.
    """

    host: str
    port: int
    weight: int = 1
    priority: int = 0
    """SRV priority: lower is preferred; the next group serves only as fallback."""
    origin: str = field(default="literal", compare=False)
    """How it was found: "literal", "name", "srv", "file" or "plugin"."""
    source: str = field(default="", compare=False)
    """The name, SRV name, file path or plugin name it came from ("" for literal)."""
    family: socket.AddressFamily = field(init=False, compare=False, repr=False)
    """AF_INET or AF_INET6, by ``host``."""
    text: str = field(init=False, compare=False, repr=False)
    """``host:port`` (``[host]:port`` for IPv6), as ``str()`` gives it."""

    def __post_init__(self) -> None:
        # Both are read per connection (the upstream socket, the flow's endpoint):
        # made once here, not per read.
        v6 = ":" in self.host
        object.__setattr__(self, "family", socket.AF_INET6 if v6 else socket.AF_INET)
        object.__setattr__(self, "text", s.format_address(self.host, self.port))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class NamedEndpoint:
    """ "name:port" or ``{ address = "name:port", weight = N }``: followed in DNS."""

    name: str
    """A DNS name (validated syntactically, never resolved by ``l4gw check``)."""
    port: int
    weight: int
    """Given to each address the name resolves to (as Envoy's STRICT_DNS does)."""

    def __str__(self) -> str:
        return f"{self.name}:{self.port}"


@dataclass(frozen=True, slots=True)
class SrvEndpoint:
    """``{ srv = "_api._tcp.example.internal" }``: the SRV targets, followed in DNS."""

    srv: str

    def __str__(self) -> str:
        return f"srv {self.srv}"


EndpointSpec = Endpoint | NamedEndpoint | SrvEndpoint
"""One item of ``endpoints`` (or of an ``endpoints_file``)."""


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``[dns]``: how names in endpoints are resolved."""

    servers: tuple[tuple[str, int], ...] = ()
    """Empty: the system's (/etc/resolv.conf)."""
    family: str = "any"
    """ "any" | "ipv4" | "ipv6"."""
    min_ttl: float = 1.0
    """A record's TTL is clamped into [min_ttl, max_ttl] (seconds)."""
    max_ttl: float = 300.0
    timeout: float = 2.0
    """Per query (seconds)."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    drain_timeout: float
    buffer_size: int
    admit_on_error: str
    route_on_error: str
    log_connections: bool
    log_level: str
    log_format: str
    watch_config: bool
    disable_plugins: tuple[str, ...]
    workers: int
    user: str
    group: str


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    protocol: str
    transparent: bool
    max_connections: int
    on_max_connections: str
    backlog: int
    peek_timeout: float
    peek_max: int
    proxy_protocol: bool
    proxy_protocol_trusted: tuple[IPNetwork, ...]
    session_idle_timeout: float
    max_sessions: int

    @property
    def bind(self) -> str:
        return s.format_address(self.host, self.port)

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    listener: str
    clusters: tuple[tuple[str, int], ...]
    """(cluster, weight) pairs; one pair for a plain ``cluster = "..."``."""
    destination: tuple[IPNetwork, ...]
    ports: frozenset[int]
    sni: tuple[str, ...]
    alpn: tuple[str, ...]
    """ALPN protocol names; the route matches a client offering any one of them."""
    source: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float
    idle_timeout: float
    connect_attempts: int
    connect_budget: float
    balance: str
    on_no_healthy: str
    health_check: Mapping[str, Any] | None
    outlier: Mapping[str, Any] | None
    upstream_source: str
    proxy_protocol: str
    proxy_protocol_traceparent: bool
    names: tuple[NamedEndpoint | SrvEndpoint, ...] = ()
    """The names and SRV names of ``endpoints``, followed in DNS by each worker."""
    endpoints_file: str | None = None
    """An absolute path: a JSON list of endpoint forms, watched (gateway.discovery)."""
    discovery: str = ""
    """The plugin that publishes this cluster's endpoints ("" for none)."""


@dataclass(frozen=True, slots=True)
class InterceptConfig:
    listener: str
    interfaces: tuple[str, ...]
    destination: tuple[IPNetwork, ...]
    ports: tuple[int, ...]
    protocol: str


@dataclass(frozen=True, slots=True)
class TproxyConfig:
    manage: bool
    mark: int
    table: int
    rule_priority: int
    intercept: tuple[InterceptConfig, ...]
    check_interval: float = 5.0
    """Seconds between two checks of the installed state by the owning gateway's guard."""


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    exporter: str
    sample_ratio: float
    service_name: str
    metrics_interval: float


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str
    port: int
    token: str
    insecure: bool = False
    max_connections: int = ADMIN_MAX_CONNECTIONS


@dataclass(frozen=True, slots=True)
class ShieldConfig:
    interfaces: tuple[str, ...]
    mode: str
    max_entries: int
    never: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class Config:
    """The whole validated file. Frozen: a reload builds a new one."""

    path: str
    gateway: GatewayConfig
    listeners: tuple[ListenerConfig, ...]
    routes: tuple[RouteConfig, ...]
    clusters: Mapping[str, ClusterConfig]
    tproxy: TproxyConfig | None = None
    telemetry: TelemetryConfig = field(
        default_factory=lambda: TelemetryConfig("none", 1.0, "l4gw", 10.0)
    )
    admin: AdminConfig | None = None
    dns: DnsConfig = field(default_factory=DnsConfig)
    shield: ShieldConfig | None = None
    """``[shield]``: the kernel shield is loaded only when the file has the section."""
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Validated ``[plugin.<name>]`` sections, by plugin name: every declared
    section except one the file leaves out whose schema has a required key."""
    notes: tuple[str, ...] = ()
    """What validation ignored without it being a problem, one line each with its
    key path (``plugin.geo_deny: ignored: ...``): for ``l4gw check`` and the log."""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def listener(self, name: str) -> ListenerConfig:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)

    def plugin(self, name: str) -> Mapping[str, Any]:
        """A plugin's validated section, every default filled in.

        When the file has no ``[plugin.<name>]``: the schema's defaults, or an
        empty mapping when the schema has a required key: such a plugin is not
        configured, and should stay idle (``if not config.plugin(name): ...``).
        """
        return self.plugins.get(name, MappingProxyType({}))


class ConfigError(Exception):
    """The file cannot be used. ``problems`` lists each one with its key path."""

    def __init__(self, path: str, problems: list[str]) -> None:
        # A problem may quote a value: a URL's password must not reach the terminal or log.
        problems = [redact_text(p) for p in problems]
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems

    def report(self) -> str:
        return "\n".join(f"{self.path}: {p}" for p in self.problems)


def load(
    path: str | Path,
    plugin_schemas: Mapping[str, s.Schema] | None = None,
    plugin_names: Collection[str] | None = None,
) -> Config:
    """Read, parse and validate a config file.

    Args:
        path: the TOML file.
        plugin_schemas: ``{plugin name: schema}`` declared by loaded plugins.
        plugin_names: every loaded plugin, for ``[cluster.NAME] discovery``
            (None: not checked).

    Raises:
        ConfigError: listing every problem found.
    """
    return from_dict(read(path), str(path), plugin_schemas or {}, plugin_names)


MAX_FILE_SIZE = 16 << 20
"""A config file is read whole; ``-c /dev/urandom`` must not be."""


def read(path: str | Path) -> dict[str, Any]:
    """The TOML document in ``path``, parsed but not validated.

    Raises:
        ConfigError: with one problem: the file cannot be read (missing, a
            directory, no permission), is larger than :data:`MAX_FILE_SIZE`, is
            not UTF-8 text (TOML is UTF-8 only) or is not TOML.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"]) from None
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(path, [f"larger than {s.format_size(MAX_FILE_SIZE)}: not a config file"])
    try:
        # tomllib would raise a bare UnicodeDecodeError, which is no TOMLDecodeError.
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            path,
            [f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line})"],
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    except RecursionError:
        # tomllib recurses once per nesting level: a few hundred "[" exhaust the stack.
        raise ConfigError(path, ["arrays or tables nested too deeply to read"]) from None
    except ValueError as exc:
        # tomllib's int() of an integer longer than sys.get_int_max_str_digits() raises
        # a bare ValueError ("Exceeds the limit (4300 digits) ...; use sys.set_...").
        why = str(exc).split(";")[0]
        raise ConfigError(path, [f"an integer too long to read ({why})"]) from None


def from_dict(
    raw: Mapping[str, Any],
    path: str,
    plugin_schemas: Mapping[str, s.Schema],
    plugin_names: Collection[str] | None = None,
) -> Config:
    """Validate an already parsed document (see :func:`load`)."""
    problems: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(f"{key}: unknown section")

    g = s.check_section(raw.get("gateway", {}), "gateway", GATEWAY, problems)
    gateway = GatewayConfig(**g) if g else None
    if gateway is not None and gateway.user:
        try:
            resolve_identity(gateway.user, gateway.group)
        except IdentityError as exc:
            problems.append(f"gateway.{exc.key}: {exc}")
    elif gateway is not None and gateway.group:
        problems.append("gateway.group: needs gateway.user")

    listeners: list[ListenerConfig] = []
    if not raw.get("listener"):
        # A gateway without one serves nothing; on a reload, an empty or half-written
        # file would close every listener.
        problems.append("listener: at least one [[listener]] is required")
    for i, item in enumerate(_array(raw, "listener", problems)):
        v = s.check_section(item, f"listener[{i}]", LISTENER, problems)
        if v is None or "name" not in v or "bind" not in v:
            continue
        host, port = v.pop("bind")
        if v["protocol"] == "udp" and v["proxy_protocol"]:
            problems.append(
                f"listener[{i}].proxy_protocol: a UDP listener cannot take PROXY headers"
            )
        elif v["proxy_protocol"] and not v["proxy_protocol_trusted"]:
            # A header is taken only from a trusted source (anyone else could claim
            # any client address), so with no CIDR every connection would be refused.
            problems.append(
                f"listener[{i}].proxy_protocol_trusted: required with proxy_protocol = true "
                "(the CIDRs of the proxies in front; without any every connection is refused)"
            )
        if port == 0 and gateway is not None and gateway.workers > 1 and v["protocol"] == "tcp":
            problems.append(
                f"listener[{i}].bind: port 0 (any free port) cannot be shared by "
                f"{gateway.workers} workers: each would get a port of its own"
            )
        listeners.append(ListenerConfig(host=host, port=port, **v))
    _unique([li.name for li in listeners], "listener", "name", problems)
    binds = [(li.protocol, li.host, li.port) for li in listeners if li.port]
    _unique([f"{p} {s.format_address(h, n)}" for p, h, n in binds], "listener", "bind", problems)

    clusters: dict[str, ClusterConfig] = {}
    cluster_raw = raw.get("cluster", {})
    if not isinstance(cluster_raw, Mapping):
        problems.append("cluster: expected tables like [cluster.api]")
        cluster_raw = {}
    for cname, item in cluster_raw.items():
        try:
            s.name(cname)
        except Invalid as exc:
            problems.append(f"cluster.{cname}: {exc}")
        v = s.check_section(item, f"cluster.{cname}", CLUSTER, problems)
        if v is None:
            continue
        clusters[cname] = _cluster(cname, item, v, path, plugin_names, problems)

    listener_names = {li.name for li in listeners}
    routes: list[RouteConfig] = []
    for i, item in enumerate(_array(raw, "route", problems)):
        where = f"route[{i}]"
        v = s.check_section(item, where, ROUTE, problems)
        if v is None or "listener" not in v:
            continue
        if v["listener"] not in listener_names:
            problems.append(f'{where}.listener: no listener named "{v["listener"]}"')
        split = tuple((c["cluster"], c["weight"]) for c in v["clusters"])
        if v["cluster"] and split:
            problems.append(f"{where}: give cluster or clusters, not both")
        elif v["cluster"]:
            split = ((v["cluster"], 1),)
        elif not split:
            problems.append(f"{where}.cluster: required")
        for j, (cname, _) in enumerate(split):
            if cname not in clusters and cname not in cluster_raw:
                key = f"{where}.cluster" if v["cluster"] else f"{where}.clusters[{j}].cluster"
                problems.append(f'{key}: no cluster named "{cname}"')
        if split and not any(w for _, w in split):
            problems.append(f"{where}.clusters: every weight is 0")
        routes.append(
            RouteConfig(
                name=v["name"] or f"route{i}",
                listener=v["listener"],
                clusters=split,
                destination=v["destination"],
                ports=frozenset(v["ports"]),
                sni=v["sni"],
                alpn=v["alpn"],
                source=v["source"],
            )
        )
    _unique([r.name for r in routes], "route", "name", problems)

    tproxy = None
    if "tproxy" in raw:
        t = s.check_section(raw["tproxy"], "tproxy", TPROXY, problems)
        if t is not None:
            intercepts = tuple(InterceptConfig(**i) for i in t.pop("intercept"))
            tproxy = TproxyConfig(intercept=intercepts, **t)
            by_name = {li.name: li for li in listeners}
            for i, ic in enumerate(intercepts):
                li = by_name.get(ic.listener)
                where = f"tproxy.intercept[{i}].listener"
                if li is None:
                    problems.append(f'{where}: no listener named "{ic.listener}"')
                elif not li.transparent:
                    problems.append(f'{where}: listener "{li.name}" needs transparent = true')
                elif li.protocol != ic.protocol:
                    problems.append(
                        f'{where}: listener "{li.name}" is {li.protocol}, not {ic.protocol}'
                    )
                elif li.port == 0:
                    problems.append(f'{where}: listener "{li.name}" needs a fixed port for TPROXY')
                else:
                    # A listener socket has one family (IPv6 ones are V6ONLY), so TPROXY
                    # can hand it only destinations of that family.
                    version = 6 if li.family == socket.AF_INET6 else 4
                    other = [str(n) for n in ic.destination if n.version != version]
                    if other:
                        problems.append(
                            f"tproxy.intercept[{i}].destination: {', '.join(other)} cannot reach "
                            f'the IPv{version} listener "{li.name}"; intercept them in another '
                            f"[[tproxy.intercept]] with an IPv{10 - version} listener"
                        )

    tel = s.check_section(raw.get("telemetry", {}), "telemetry", TELEMETRY, problems)
    telemetry = TelemetryConfig(**tel) if tel else None

    admin = None
    if "admin" in raw:
        a = s.check_section(raw["admin"], "admin", ADMIN, problems)
        if a is not None:
            host, port = a["bind"]
            token = a["token_file"].value if a["token_file"] else a["token"]
            admin = AdminConfig(host, port, token, a["insecure"], a["max_connections"])
            if not admin.token and not admin.insecure and not is_loopback(host):
                problems.append(
                    f'admin.bind: "{s.format_address(host, port)}" is not loopback: set '
                    "admin.token or admin.token_file (or admin.insecure = true to serve "
                    "/config, /connections "
                    "and /metrics to the network without one)"
                )

    dns = _dns(raw.get("dns", {}), problems)
    shield = _shield(raw["shield"], tproxy, problems) if "shield" in raw else None

    plugins, notes = _plugin_sections(raw, gateway, plugin_schemas, problems)

    if problems or gateway is None or telemetry is None:
        raise ConfigError(path, problems or ["invalid"])
    return Config(
        path=path,
        gateway=gateway,
        listeners=tuple(listeners),
        routes=tuple(routes),
        clusters=MappingProxyType(clusters),
        tproxy=tproxy,
        telemetry=telemetry,
        admin=admin,
        dns=dns or DnsConfig(),
        shield=shield,
        plugins=MappingProxyType(plugins),
        notes=tuple(notes),
        raw=raw,
    )


def _shield(section: Any, tproxy: TproxyConfig | None, problems: list[str]) -> ShieldConfig | None:
    v = s.check_section(section, "shield", SHIELD, problems)
    if v is None:
        return None
    if not v["interfaces"]:
        intercepted = tproxy.intercept if tproxy is not None else ()
        v["interfaces"] = tuple(dict.fromkeys(i for ic in intercepted for i in ic.interfaces))
        if not v["interfaces"]:
            problems.append(
                "shield.interfaces: required (no [[tproxy.intercept]] names its interfaces)"
            )
    for i, name in enumerate(v["interfaces"]):
        if len(name) > 15:  # linux/if.h: IFNAMSIZ = 16, with the NUL
            problems.append(f'shield.interfaces[{i}]: "{name}" is longer than 15 characters')
    return ShieldConfig(**v)


def _cluster(
    cname: str,
    item: Mapping[str, Any],
    v: dict[str, Any],
    path: str,
    plugin_names: Collection[str] | None,
    problems: list[str],
) -> ClusterConfig:
    """One cluster from its checked keys.

    Its endpoints come from exactly one of ``endpoints`` (literal addresses,
    names and SRV names, combined), ``endpoints_file`` or ``discovery``: a file
    or a plugin publishes the whole set, so a literal list beside it would be
    either overridden or merged, and neither reading is obvious to whoever edits
    the file next.
    """
    where = f"cluster.{cname}"
    # By value, not presence: /config writes every key (endpoints = [] beside a file).
    given = [k for k in ("endpoints", "endpoints_file", "discovery") if v[k]]
    if len(given) > 1:
        problems.append(
            f"{where}: give one of endpoints, endpoints_file or discovery, not "
            + " and ".join(given)
        )
    elif not given and "endpoints" in item:
        problems.append(f"{where}.endpoints: needs at least 1 item")
    elif not given:
        problems.append(f"{where}.endpoints: required (or endpoints_file, or discovery)")
    discovery = v.pop("discovery")
    if discovery and plugin_names is not None and discovery not in plugin_names:
        problems.append(
            f'{where}.discovery: no loaded plugin is named "{discovery}" '
            f"(loaded: {', '.join(sorted(plugin_names)) or 'none'})"
        )
    specs = v.pop("endpoints")
    file = v.pop("endpoints_file")
    if "endpoints_file" in item and not file:
        problems.append(f"{where}.endpoints_file: an empty path")
    if file:
        # Relative to the config file, like Prometheus' file_sd: the pair moves together.
        file = str(Path(path).parent / file) if not Path(file).is_absolute() else file
    return ClusterConfig(
        name=cname,
        endpoints=tuple(e for e in specs if isinstance(e, Endpoint)),
        names=tuple(e for e in specs if not isinstance(e, Endpoint)),
        endpoints_file=file or None,
        discovery=discovery,
        **v,
    )


def _dns(raw: Any, problems: list[str]) -> DnsConfig | None:
    d = s.check_section(raw, "dns", DNS, problems)
    if d is None:
        return None
    servers: list[tuple[str, int]] = []
    for i, text in enumerate(d.pop("servers")):
        try:
            ip = ipaddress.ip_address(text)
            servers.append((str(ip), 53))
            continue
        except ValueError:
            pass
        try:
            host, port = s.split_host_port(text)
        except ValueError:
            problems.append(
                f'dns.servers[{i}]: not an address: "{text}" '
                '(expected "1.2.3.4", "1.2.3.4:5353", "::1" or "[::1]:5353")'
            )
            continue
        if port == 0:
            problems.append(f'dns.servers[{i}]: port 0 in "{text}"')
            continue
        servers.append((host, port))
    if d["min_ttl"] > d["max_ttl"]:
        problems.append("dns.max_ttl: shorter than min_ttl")
    return DnsConfig(servers=tuple(servers), **d)


def _plugin_sections(
    raw: Mapping[str, Any],
    gateway: GatewayConfig | None,
    plugin_schemas: Mapping[str, s.Schema],
    problems: list[str],
) -> tuple[dict[str, Mapping[str, Any]], list[str]]:
    """The ``[plugin.<name>]`` sections: (validated sections by name, notes).

    Rules:

    * A section no loaded plugin declares is a problem (a typo must not be
      ignored), unless ``[gateway] disable_plugins`` names it: the plugin is not
      loaded so its schema is unknown, and turning a plugin off must not mean
      deleting its settings too. Its section is left out, with a note.
    * A declared section the file leaves out is the schema's defaults; when the
      schema has a required key, the plugin is simply not configured (left out:
      ``Config.plugin`` gives it an empty mapping). Installing a plugin must not
      make every configuration that never mentions it invalid.
    """
    sections: dict[str, Mapping[str, Any]] = {}
    notes: list[str] = []
    plugin_raw = raw.get("plugin", {})
    if not isinstance(plugin_raw, Mapping):
        problems.append("plugin: expected tables like [plugin.accesslog]")
        plugin_raw = {}
    if gateway is not None:
        disabled = set(gateway.disable_plugins)
    else:
        # [gateway] has a problem of its own: still no second one for each section.
        listed = raw.get("gateway", {}) if isinstance(raw.get("gateway"), Mapping) else {}
        value = listed.get("disable_plugins", [])
        disabled = {v for v in value if isinstance(v, str)} if isinstance(value, list) else set()
    for pname in plugin_raw:
        if pname in plugin_schemas:
            continue
        if pname in disabled:
            notes.append(
                f"plugin.{pname}: ignored: the plugin is disabled ([gateway] disable_plugins)"
            )
        else:
            problems.append(f"plugin.{pname}: no installed plugin declares this section")
    for pname, pschema in plugin_schemas.items():
        if pname not in plugin_raw and any(f.default is s.REQUIRED for f in pschema.values()):
            continue
        pv = s.check_section(plugin_raw.get(pname, {}), f"plugin.{pname}", pschema, problems)
        if pv is not None:
            sections[pname] = MappingProxyType(pv)
    return sections, notes


def _array(raw: Mapping[str, Any], key: str, problems: list[str]) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        problems.append(f"{key}: expected an array of tables like [[{key}]]")
        return []
    return value


def _unique(values: list[str], section: str, key: str, problems: list[str]) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            problems.append(f'{section}[{i}].{key}: duplicate "{value}"')
        seen.add(value)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback
