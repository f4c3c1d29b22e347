"""A small Redis client on trio: RESP2, TLS, ACL users, Sentinel.

What the shared rate-limit buckets (plugins/ratelimit/redis.py) need of
Redis and nothing more: one connection, one request at a time, the
connection set up as operators run Redis.

Rules kept here:

* **A connection is usable or closed.** It is authenticated (``AUTH user
  password``, an ACL user, or ``AUTH password``), on its db (``SELECT``) and,
  behind Sentinel, on the primary (``ROLE``), before any command goes over
  it; any failure on the way closes it. A call that is cancelled or fails
  closes it too: the reply may still come, and must never be read as the
  answer to the next command. The next call connects again.
* **Errors are two kinds.** :class:`RespError`: Redis answered with an error
  (``WRONGPASS``, ``NOSCRIPT``, ``READONLY``...); :class:`RedisUnavailable`:
  no usable answer (refused, reset, TLS handshake or certificate failure,
  a sentinel that knows no primary). The caller bounds every call with a
  cancel scope; nothing here has a timeout of its own.
* **Sentinel**: the sentinels are asked in order for the primary of the
  service (``SENTINEL GET-MASTER-ADDR-BY-NAME``); the first that answers is
  asked first next time. The primary is asked its ``ROLE``: after a failover
  a sentinel may still name the old primary, now a replica, which would
  refuse every script with ``READONLY``. A ``READONLY`` reply closes the
  connection (the caller does), so the next call asks the sentinels again.
  Sentinels are asked without a password, over TLS when the URL is
  ``rediss://``.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .buckets import RedisAddress


class RespError(Exception):
    """Redis answered with an error reply."""


class RedisUnavailable(Exception):
    """No usable answer from Redis (connect failure, closed connection, bad reply)."""


def encode_command(args: Sequence[Any]) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class Sentinels:
    """Where to ask for the primary (``[plugin.ratelimit] redis_sentinel``)."""

    service: str
    """The primary's name in the sentinels' configuration (``sentinel monitor NAME``)."""
    addresses: tuple[tuple[str, int], ...]


class _Connection:
    """One stream and its read buffer; parses RESP2 replies."""

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.sock = sock
        self.buf = bytearray()

    def close(self) -> None:
        # No TLS close_notify: this runs on cancel and error paths, which must not wait.
        self.sock.close()

    async def roundtrip(self, args: Sequence[Any]) -> Any:
        await self.stream.send_all(encode_command(args))
        reply = await self._reply()
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise RedisUnavailable("connection closed by Redis")
        self.buf += data

    async def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            await self._fill()

    async def _reply(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                await self._fill()
            data = bytes(self.buf[:n])
            del self.buf[: n + 2]
            return data
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [await self._reply() for _ in range(n)]
        raise RedisUnavailable(f"not a RESP reply: {line[:40]!r}")


async def _open(
    host: str, port: int, tls: ssl.SSLContext | None, server_name: str | None
) -> _Connection:
    tcp = await trio.open_tcp_stream(host, port)
    if tls is None:
        return _Connection(tcp, tcp.socket)
    stream = trio.SSLStream(tcp, tls, server_hostname=server_name or host)
    try:
        await stream.do_handshake()
    except BaseException:
        tcp.socket.close()
        raise
    return _Connection(stream, tcp.socket)


class RespClient:
    """One connection to Redis, one request at a time.

    Args:
        address: from ``redis_url`` (credentials, db, TLS on or off; host and
            port unless ``sentinels`` is given).
        tls: the TLS context for a ``rediss://`` URL.
        server_name: the name the server's certificate must hold (default:
            the host connected to).
        sentinels: ask these for the primary instead of using the URL's host.
    """

    def __init__(
        self,
        address: RedisAddress,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        sentinels: Sentinels | None = None,
    ) -> None:
        self.address = address
        self.tls = tls
        self.server_name = server_name
        self.sentinels = sentinels
        self._sentinel_order = list(sentinels.addresses) if sentinels else []
        self._conn: _Connection | None = None
        self._lock = trio.Lock()
        self.primary: tuple[str, int] | None = None
        """Where the connection goes (the URL's host, or the sentinels' answer)."""

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply.

        Raises:
            RespError: Redis answered with an error.
            RedisUnavailable: connecting, sending or reading failed.
        """
        async with self._lock:
            try:
                if self._conn is None:
                    self._conn = await self._connect()
                return await self._conn.roundtrip(args)
            except RespError:
                raise
            except RedisUnavailable:
                self.close()
                raise
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.close()
                raise RedisUnavailable(_describe(exc)) from exc
            except BaseException:
                # Cancelled mid-call: the reply may still arrive; never read it as
                # the answer to the next command.
                self.close()
                raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _connect(self) -> _Connection:
        a = self.address
        if self.sentinels is not None:
            host, port = await self._ask_sentinels(self.sentinels)
        else:
            host, port = a.host, a.port
        self.primary = (host, port)
        conn = await _open(host, port, self.tls, self.server_name)
        try:
            if a.password is not None:
                auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
                await conn.roundtrip(auth)
            if a.db:
                await conn.roundtrip(("SELECT", a.db))
            if self.sentinels is not None:
                role = await conn.roundtrip(("ROLE",))
                if not role or role[0] != b"master":
                    raise RedisUnavailable(
                        f"{_hostport(host, port)}, named primary by the sentinels, is a "
                        f"{_text(role[0]) if role else 'server of no role'}"
                    )
        except BaseException:
            # Never keep a connection that is not authenticated, on the wrong db or
            # on a replica.
            conn.close()
            raise
        return conn

    async def _ask_sentinels(self, sentinels: Sentinels) -> tuple[str, int]:
        problems: list[str] = []
        for sentinel in list(self._sentinel_order):
            host, port = sentinel
            try:
                conn = await _open(host, port, self.tls, self.server_name)
            except (OSError, trio.BrokenResourceError) as exc:
                problems.append(f"sentinel {_hostport(host, port)}: {_describe(exc)}")
                continue
            try:
                reply = await conn.roundtrip(
                    ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", sentinels.service)
                )
            except (RespError, RedisUnavailable, OSError, trio.BrokenResourceError) as exc:
                problems.append(f"sentinel {_hostport(host, port)}: {_describe(exc)}")
                continue
            finally:
                conn.close()
            if not reply:
                problems.append(
                    f'sentinel {_hostport(host, port)}: no primary named "{sentinels.service}"'
                )
                continue
            # The one that answered is asked first next time.
            self._sentinel_order.remove(sentinel)
            self._sentinel_order.insert(0, sentinel)
            return _text(reply[0]), int(reply[1])
        raise RedisUnavailable("; ".join(problems) or "no sentinel configured")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(exc: BaseException) -> str:
    # trio wraps a failed TLS handshake: the ssl error (a bad certificate) is the cause.
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
    shown = cause if cause is not None else exc
    return f"{shown.__class__.__name__}: {shown}"


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """``[plugin.ratelimit] redis_tls``: how a ``rediss://`` connection checks and is checked.

    Equal options mean the same files with the same contents (``digest``), so a
    reload after a certificate was rotated in place makes a new context.
    """

    ca_file: str = ""
    """CA bundle (PEM) the server's certificate must chain to; empty: the system's."""
    cert_file: str = ""
    """Client certificate (PEM), for a server with ``tls-auth-clients yes``."""
    key_file: str = ""
    """Its private key; empty: in ``cert_file``."""
    key_password: str | None = field(default=None, repr=False)
    server_name: str = ""
    """The name the certificate must hold, also sent as SNI; empty: the host connected to."""
    digest: str = ""

    def context(self) -> ssl.SSLContext:
        """A client context: certificate and host name checked, TLS 1.2 at least.

        Raises:
            ValueError: a file cannot be read or is not what it should be
                (the message names it).
        """
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f'ca_file "{self.ca_file}": {_ssl_reason(exc)}') from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file or None, self.key_password)
            except (OSError, ssl.SSLError) as exc:
                files = f'"{self.cert_file}"' + (f' and "{self.key_file}"' if self.key_file else "")
                why = _ssl_reason(exc)
                if isinstance(exc, ssl.SSLError):
                    why = (
                        "not a PEM certificate and its private key, or a wrong "
                        f"key_password_file ({why})"
                    )
                raise ValueError(f"cert_file {files}: {why}") from None
        return ctx


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
