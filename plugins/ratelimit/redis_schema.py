"""The Redis keys of ``[plugin.ratelimit]``: where the shared buckets live and how to reach them.

Apart from the plugin's own keys (plugins/ratelimit/plugin.py merges these
into its section) because they are a concept of their own: a URL (inline or
from a secret file), TLS options, Sentinel, and the lease and outage policy
of plugins/ratelimit/redis.py.

Rules kept here:

* **Every problem is found by ``l4gw check``**, with its key path: a URL that
  does not parse, a TLS file that cannot be read or is not a certificate or
  key (the TLS context is built once here to find out), a key whose
  passphrase is wrong, a sentinel that is not ``host[:port]``.
* **Nested tables keep their schema in the converter's closure**
  (:func:`_table_then`), where scripts/gen-config-docs.py and ``/config``
  (gateway/effective.py) find it.
* A problem never quotes a password (``parse_url`` is careful; a secret
  file's text is never quoted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from gateway import Field, Invalid
from gateway import schema as s

from .buckets import parse_url
from .resp import Sentinels, TlsOptions

SENTINEL_PORT = 26379


def _table_then(schema: dict[str, Field], finish: Callable[[dict[str, Any]], Any]) -> s.Converter:
    """A nested table checked against ``schema``, then made a value by ``finish``."""
    table = s.table(schema)

    def convert(value: Any) -> Any:
        return finish(table(value))

    return convert


def _redis_url(value: Any) -> str:
    text = s.string(value)
    try:
        parse_url(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return text


REDIS_TLS = {
    "ca_file": Field(
        s.string, "", "CA bundle (PEM) the server's certificate must chain to (empty: the system's)"
    ),
    "cert_file": Field(s.string, "", "client certificate (PEM), for tls-auth-clients"),
    "key_file": Field(s.string, "", "its private key (PEM; empty: in cert_file)"),
    "key_password_file": Field(
        s.secret_file(), None, "file holding the passphrase of an encrypted key_file"
    ),
    "server_name": Field(
        s.string, "", "name the certificate must hold, sent as SNI (empty: the host)"
    ),
}


def _tls_options(t: dict[str, Any]) -> TlsOptions:
    digest = hashlib.sha256()
    for key in ("ca_file", "cert_file", "key_file"):
        if t[key]:
            try:
                with open(t[key], "rb") as f:
                    digest.update(f.read(1 << 20))
            except OSError as exc:
                raise Invalid(problems=[(f".{key}", f'cannot read "{t[key]}": {exc.strerror}')])
    if t["key_file"] and not t["cert_file"]:
        raise Invalid(problems=[(".key_file", "needs cert_file")])
    password = t["key_password_file"]
    options = TlsOptions(
        ca_file=t["ca_file"],
        cert_file=t["cert_file"],
        key_file=t["key_file"],
        key_password=password.value if password is not None else None,
        server_name=t["server_name"],
        digest=digest.hexdigest(),
    )
    try:
        options.context()  # a bad certificate, key or passphrase is a problem of the file
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return options


REDIS_SENTINEL = {
    "service": Field(s.string, doc="the primary's name in the sentinels (sentinel monitor NAME)"),
    "sentinels": Field(
        s.list_of(lambda v: _host_port(v, SENTINEL_PORT), min_items=1),
        doc='"host[:port]" of each sentinel (a name or an address; port 26379 by default)',
    ),
}


def _host_port(value: Any, default_port: int) -> tuple[str, int]:
    text = s.string(value)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise Invalid(f'not "host[:port]": "{text}"')
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host or any(c.isspace() for c in host):
        raise Invalid(f'not "host[:port]": "{text}"')
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise Invalid(f'invalid port "{port_text}" (1 to 65535)')
    return host, int(port_text)


def _sentinels(t: dict[str, Any]) -> Sentinels:
    if not t["service"]:
        raise Invalid(problems=[(".service", "must not be empty")])
    return Sentinels(t["service"], tuple(t["sentinels"]))


REDIS_SCHEMA: dict[str, Field] = {
    "redis_url": Field(
        _redis_url,
        "redis://127.0.0.1:6379/0",
        "redis://[[user]:password@]host[:port][/db] (rediss://: TLS, see redis_tls); in the "
        'password write "/", "?", "#", '
        '"[" and "]" as %2F, %3F, %23, %5B and %5D',
    ),
    "redis_url_file": Field(
        s.secret_file(_redis_url),
        None,
        "read redis_url from this file instead (a mounted secret; read again on reload)",
    ),
    "redis_tls": Field(
        _table_then(REDIS_TLS, _tls_options),
        None,
        "TLS options of a rediss:// URL (without: the system's CAs)",
    ),
    "redis_sentinel": Field(
        _table_then(REDIS_SENTINEL, _sentinels),
        None,
        "ask these sentinels for the primary, instead of redis_url's host and port "
        '(redis_sentinel = { service = "mymaster", sentinels = ["10.0.0.1:26379"] })',
    ),
    "redis_timeout": Field(s.positive_duration, 0.25, "a Redis call slower than this is an error"),
    "redis_lease": Field(
        s.integer(1, 1000),
        5,
        "most tokens taken from Redis per call and spent locally (never more than a quarter "
        "of what the bucket holds, at least one)",
    ),
    "redis_lease_ttl": Field(
        s.positive_duration, 1.0, "unspent leased tokens go back to Redis after this"
    ),
    "redis_retry": Field(s.duration, 1.0, "while Redis is down, try it again this often"),
    "redis_key_prefix": Field(s.string, "l4gw:rl:", "prefix of every Redis key"),
    "on_backend_error": Field(
        s.choice("local", "open", "closed"),
        "local",
        "Redis unreachable: limit with this process's own buckets (local), admit (open) "
        "or refuse (closed)",
    ),
}
"""The keys, in the order the docs list them."""
