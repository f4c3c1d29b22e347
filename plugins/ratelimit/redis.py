"""Rate-limit buckets shared through Redis (``[plugin.ratelimit] backend = "redis"``).

Every gateway process and host that points at the same Redis shares each
bucket. A bucket is a Redis hash (tokens, timestamp) updated by one Lua
script, atomically, with Redis's own clock (``TIME``), so hosts with skewed
clocks still agree. One script call serves every rule of a connection.

Redis is kept off most connections' path by **leases**: a call takes up to
``redis_lease`` tokens at once and this process spends them locally for up
to ``redis_lease_ttl``; an empty bucket is remembered locally until Redis
said the next token would be there. Leasing never admits more than the
bucket allows (tokens leave Redis before they are spent); unspent leased
tokens expire, which can only admit fewer.

Redis I/O is a small RESP2 client over trio sockets rather than redis-py's
synchronous client in worker threads: trio's cancel scopes bound every call
(``redis_timeout``) and cancel it for real; a stalled Redis cannot pile up
blocked threads and exhaust trio's thread limiter, which every
``to_thread`` user of the process would then queue behind; and there is no
thread hop per call. The client sends one request at a time over one
connection; a call cut short by its timeout closes the connection, since
the reply may still come.

Outages: when Redis is unreachable or slow (connect error, timeout, error
reply), ``on_backend_error`` decides: "local" (the default) answers
``BACKEND_LOCAL`` and the plugin limits with this process's own buckets,
"open" admits, "closed" refuses with rule ``backend_error``. While it is down only one call every
``redis_retry`` tries it again; everything else applies the policy at once.
The outage is logged once when it starts and once when it ends, never per
connection.

Not supported: Redis Cluster (a connection's keys would need one hash
slot), TLS, Sentinel.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from opentelemetry import metrics

from gateway import redact_text

from .buckets import (
    BACKEND_ERROR,
    BACKEND_LOCAL,
    Backend,
    Check,
    LruTable,
    Nursery,
    RedisAddress,
    parse_url,
)

log = logging.getLogger("l4gw.ratelimit")

# KEYS: one bucket per rule. ARGV[1]: tokens wanted; then rate (tokens/s)
# and burst for each key. Returns {granted, wait_ms} per key: wait_ms is how
# long until the next whole token when nothing was granted.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local want = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local b = redis.call('HMGET', key, 't', 's')
  local tokens = tonumber(b[1])
  local stamp = tonumber(b[2])
  if tokens == nil or stamp == nil then
    tokens = burst
    stamp = now
  end
  if now > stamp then
    tokens = math.min(burst, tokens + (now - stamp) * rate)
  end
  local granted = math.min(want, math.floor(tokens))
  tokens = tokens - granted
  redis.call('HSET', key, 't', string.format('%.6f', tokens), 's', string.format('%.6f', now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
  local wait = 0
  if granted < 1 then
    wait = math.ceil((1 - tokens) / rate * 1000)
  end
  out[i] = {granted, wait}
end
return out
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

_MAX_EMPTY_CACHE = 5.0
"""Longest a "bucket empty" answer is trusted locally (seconds)."""


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


class RespClient:
    """One connection to Redis, one request at a time.

    The caller bounds each :meth:`call` with a cancel scope; a call that is
    cancelled or fails closes the connection (the next call reconnects).
    """

    def __init__(self, address: RedisAddress) -> None:
        self.address = address
        self._stream: trio.SocketStream | None = None
        self._buf = bytearray()
        self._lock = trio.Lock()

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply.

        Raises:
            RespError: Redis answered with an error.
            RedisUnavailable: connecting, sending or reading failed.
        """
        async with self._lock:
            try:
                if self._stream is None:
                    await self._connect()
                return await self._roundtrip(args)
            except RespError:
                raise
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.close()
                raise RedisUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
            except BaseException:
                # Cancelled mid-call: the reply may still arrive; never read it as
                # the answer to the next command.
                self.close()
                raise

    async def _roundtrip(self, args: Sequence[Any]) -> Any:
        assert self._stream is not None
        await self._stream.send_all(encode_command(args))
        reply = await self._reply()
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def _connect(self) -> None:
        a = self.address
        self._buf.clear()
        self._stream = await trio.open_tcp_stream(a.host, a.port)
        try:
            if a.password is not None:
                auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
                await self._roundtrip(auth)
            if a.db:
                await self._roundtrip(("SELECT", a.db))
        except BaseException:
            # Never keep a connection that is not authenticated or on the wrong db.
            self.close()
            raise

    def close(self) -> None:
        if self._stream is not None:
            self._stream.socket.close()
            self._stream = None

    async def _fill(self) -> None:
        assert self._stream is not None
        data = await self._stream.receive_some(65536)
        if not data:
            raise RedisUnavailable("connection closed by Redis")
        self._buf += data

    async def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
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
            while len(self._buf) < n + 2:
                await self._fill()
            data = bytes(self._buf[:n])
            del self._buf[: n + 2]
            return data
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [await self._reply() for _ in range(n)]
        self.close()
        raise RedisUnavailable(f"not a RESP reply: {line[:40]!r}")


# --- shared buckets ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    timeout: float
    lease: int
    lease_ttl: float
    retry: float
    key_prefix: str
    on_error: str
    """``on_backend_error``: "local", "open" or "closed"."""
    max_tracked: int

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> RedisSettings:
        return cls(
            url=section["redis_url"],
            timeout=section["redis_timeout"],
            lease=section["redis_lease"],
            lease_ttl=section["redis_lease_ttl"],
            retry=section["redis_retry"],
            key_prefix=section["redis_key_prefix"],
            on_error=section["on_backend_error"],
            max_tracked=section["max_tracked"],
        )


_ON_ERROR: dict[str, str | None] = {"local": BACKEND_LOCAL, "open": None, "closed": BACKEND_ERROR}
_ON_ERROR_TEXT = {
    "local": "to this process's own buckets",
    "open": "open (admitting)",
    "closed": "closed (refusing)",
}


class _Lease:
    """Tokens of one bucket held by this process."""

    __slots__ = ("empty_until", "expires", "pending", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.expires = 0.0
        self.empty_until = 0.0
        self.pending: trio.Event | None = None


class RedisBuckets(Backend):
    """Token buckets in Redis, spent through local leases.

    Args:
        settings: from ``[plugin.ratelimit]``.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self, settings: RedisSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.address = parse_url(settings.url)
        self.client = RespClient(self.address)
        self.leases: LruTable[_Lease] = LruTable(settings.max_tracked)
        self.calls = 0
        """Script calls made (the lease cache keeps this far below connections)."""
        self.errors = 0
        self.outages = 0
        self.down_since: float | None = None
        self._retry_at = 0.0
        meter = metrics.get_meter("l4gw.ratelimit")
        self._m_errors = meter.create_counter(
            "l4gw.ratelimit.backend.errors", "{error}", "failed calls to the shared backend"
        )
        self._m_calls = meter.create_counter(
            "l4gw.ratelimit.backend.calls", "{call}", "calls to the shared backend"
        )

    def tracked(self) -> int:
        return len(self.leases)

    def evictions(self) -> int:
        return self.leases.evictions

    def start(self, nursery: Nursery) -> None:
        nursery.start_soon(self._warm_up)

    async def _warm_up(self) -> None:
        """Connect and load the script before the first connection needs it."""
        reply = await self._call(("SCRIPT", "LOAD", SCRIPT), self.clock())
        if isinstance(reply, RespError):
            self._failed(str(reply))
        elif reply is not None:
            self._recovered()

    async def acquire(self, checks: list[Check]) -> str | None:
        for _ in range(3):
            now = self.clock()
            ready: list[_Lease] = []
            need: list[tuple[Check, _Lease]] = []
            for check in checks:
                rule, key = check
                lease = self.leases.get((rule.name, key), _Lease)
                if lease.tokens >= 1 and lease.expires > now:
                    ready.append(lease)
                elif lease.empty_until > now:
                    return rule.name
                else:
                    need.append((check, lease))
            if not need:
                for lease in ready:
                    lease.tokens -= 1
                return None
            if not await self._refill(need, now):
                return _ON_ERROR[self.settings.on_error]
        # Other connections kept spending what was fetched: the bucket is
        # as good as empty for this one.
        return need[0][0][0].name

    async def _refill(self, need: list[tuple[Check, _Lease]], now: float) -> bool:
        """Fetch tokens for ``need`` (or wait for a fetch already under way).

        Returns:
            False when Redis could not be asked or did not answer.
        """
        waits = [lease.pending for _, lease in need if lease.pending is not None]
        mine = [(check, lease) for check, lease in need if lease.pending is None]
        if mine:
            event = trio.Event()
            for _, lease in mine:
                lease.pending = event
            try:
                prefix = self.settings.key_prefix
                keys = [f"{prefix}{rule.name}:{key}" for (rule, key), _ in mine]
                args: list[Any] = [self.settings.lease]
                for (rule, _), _ in mine:
                    args += [repr(rule.rate), repr(rule.burst)]
                reply = await self._script(keys, args, now)
            finally:
                for _, lease in mine:
                    lease.pending = None
                event.set()
            if reply is None:
                return False
            after = self.clock()
            for (_, lease), (granted, wait_ms) in zip(mine, reply, strict=True):
                lease.tokens = int(granted)
                lease.expires = after + self.settings.lease_ttl
                if lease.tokens < 1:
                    lease.empty_until = after + min(int(wait_ms) / 1000, _MAX_EMPTY_CACHE)
        for pending in waits:
            await pending.wait()
        return True

    async def _script(self, keys: list[str], args: list[Any], now: float) -> Any:
        """The script's reply; None (and the outage policy) when there is none."""
        reply = await self._call(("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args), now)
        if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT"):
            # Redis answered, so this follow-up is not a retry to be rationed.
            reply = await self._call(("EVAL", SCRIPT, len(keys), *keys, *args), now, gate=False)
        if isinstance(reply, RespError):
            # Up but unusable (NOAUTH, OOM, a script error): an outage all the same.
            self._failed(str(reply))
            return None
        if reply is not None:
            self._recovered()
        return reply

    async def _call(self, command: Sequence[Any], now: float, gate: bool = True) -> Any:
        """One call, skipped while Redis is down between retries.

        Returns:
            The reply; an error reply as a :class:`RespError` value, for the
            caller to judge; None when Redis was not asked or did not answer
            (that failure is recorded here).
        """
        if gate and self.down_since is not None:
            if now < self._retry_at:
                return None
            # This call is the retry; everyone else keeps the policy meanwhile.
            self._retry_at = now + self.settings.retry
        self.calls += 1
        self._m_calls.add(1)
        try:
            with trio.fail_after(self.settings.timeout):
                return await self.client.call(*command)
        except RespError as exc:
            return exc
        except RedisUnavailable as exc:
            self._failed(str(exc))
        except trio.TooSlowError:
            self._failed(f"no answer within {self.settings.timeout:g}s")
        return None

    def _failed(self, why: str) -> None:
        self.errors += 1
        self._m_errors.add(1)
        now = self.clock()
        self._retry_at = now + self.settings.retry
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            log.error(
                "ratelimit: redis %s unusable (%s): failing %s until it answers again",
                self.address,
                redact_text(why),
                _ON_ERROR_TEXT[self.settings.on_error],
            )

    def _recovered(self) -> None:
        if self.down_since is not None:
            log.warning(
                "ratelimit: redis %s answers again after %.1fs",
                self.address,
                self.clock() - self.down_since,
            )
            self.down_since = None
