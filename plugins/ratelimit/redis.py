"""Rate-limit buckets shared through Redis (``[plugin.ratelimit] backend = "redis"``).

Every gateway process and host that points at the same Redis shares each
bucket. A bucket is a Redis hash (tokens, timestamp) updated by one Lua
script, atomically, with Redis's own clock (``TIME``), so hosts with skewed
clocks still agree. One script call serves every rule of a connection.

Rules kept here:

* **Leases keep Redis off most connections' path, and never cost a client
  its burst.** A call takes up to ``redis_lease`` tokens and this process
  spends them locally for up to ``redis_lease_ttl``; an empty bucket is
  remembered locally until Redis said the next token would be there.
  Leasing never admits more than the bucket allows (tokens leave Redis
  before they are spent). A lease never takes more than a quarter of what
  the bucket holds, and at least one token (the script decides, on the
  bucket's current tokens): a bucket of burst 5 is leased one token at a
  time, and as any bucket empties its leases shrink to one token, so when it
  runs dry no gateway sits on more than one token another gateway's
  connection could have used. A client balanced over N gateways gets its
  burst, give or take one token per gateway.
* **Unspent leased tokens go back to Redis** rather than expire: when a
  lease ends (``redis_lease_ttl`` after it was taken; a background task looks
  every half of that), in the same script call as the next lease of that
  bucket when one is needed first, and at shutdown or when a reload replaces
  the store. Tokens given back never fill a bucket past its burst.
* **Outages**: when Redis is unreachable or unusable (connect error,
  timeout, TLS failure, an error reply such as a wrong password),
  ``on_backend_error`` decides: "local" (the default) answers
  ``BACKEND_LOCAL`` and the plugin limits with this process's own buckets,
  "open" admits, "closed" refuses with rule ``backend_error``. While it is
  down only one call every ``redis_retry`` tries it again; everything else
  applies the policy at once. The outage is logged once when it starts (a
  wrong password says so, and which key to check) and once when it ends,
  never per connection.

Redis I/O: the small RESP client of plugins/ratelimit/resp.py (TLS, ACL
users, Sentinel), not a general-purpose client library. Measured here (trio
0.35, Redis 7.0.15 on loopback, 3,000 sequential EVALSHA calls of this
script, two runs): the RESP client costs 45–87 µs of gateway CPU per call
(79–113 µs wall), coredis 6.9.0 237–266 µs of CPU per call (276–326 µs
wall), and importing coredis takes 240 ms and nine more packages in every
worker. On the lease path itself (bench/ratelimit_redis.py, 2,000
``acquire`` calls, two runs): burst 5 over 200 clients made 1.2 Redis calls
per admitted connection, 68–135 µs of CPU per acquire; burst 100 over 10
clients 0.26–0.31 calls per admitted connection, 26–36 µs. With the
fairness rule above, a small bucket (burst below 8) is leased one token at a
time, so the calls are as many as the admitted connections: coredis would
add about 200 µs of CPU to every such connection, more than doubling what
the limiter costs. redis-py's asyncio client does not run on trio
(shared/reference/trio-libraries.md). So the RESP client stays, and grows
the connection set-up operators need (TLS, ACL users, Sentinel); coredis is
the choice to revisit if Redis Cluster is ever wanted.

Not supported: Redis Cluster (a connection's keys would need one hash
slot), Sentinel with a password of its own.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
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
    Rule,
    parse_url,
)
from .resp import RedisUnavailable, RespClient, RespError, Sentinels, TlsOptions, encode_command

__all__ = [
    "SCRIPT",
    "RedisBuckets",
    "RedisSettings",
    "RedisUnavailable",
    "RespClient",
    "RespError",
    "encode_command",
]

log = logging.getLogger("l4gw.ratelimit")

# KEYS: one bucket per rule. ARGV[1]: tokens wanted; then for each key its rate
# (tokens/s), burst and the unspent tokens given back. Returns {granted, wait_ms}
# per key: wait_ms is how long until the next whole token when nothing was granted.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local want = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local back = tonumber(ARGV[3 * i + 1])
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
  tokens = math.min(burst, tokens + back)
  local share = math.max(1, math.floor(tokens / 4))
  local granted = math.min(want, share, math.floor(tokens))
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

_AUTH_ERRORS = ("WRONGPASS", "NOAUTH", "ERR AUTH", "ERR invalid password")
_ACL_ERRORS = ("NOPERM",)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    """The URL in force (``redis_url``, or what ``redis_url_file`` holds)."""
    timeout: float
    lease: int
    lease_ttl: float
    retry: float
    key_prefix: str
    on_error: str
    """``on_backend_error``: "local", "open" or "closed"."""
    max_tracked: int
    tls: TlsOptions | None = None
    sentinels: Sentinels | None = None

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> RedisSettings:
        """The Redis part of a validated section.

        Raises:
            ValueError: ``redis_tls`` with a ``redis://`` URL.
        """
        url_file = section.get("redis_url_file")
        url = url_file.value if url_file is not None else section["redis_url"]
        tls = section.get("redis_tls")
        if tls is not None and not parse_url(url).tls:
            raise ValueError(
                "plugin.ratelimit.redis_tls: TLS needs a rediss:// URL (redis_url"
                + (f' in "{url_file.path}")' if url_file is not None else ")")
            )
        return cls(
            url=url,
            timeout=section["redis_timeout"],
            lease=section["redis_lease"],
            lease_ttl=section["redis_lease_ttl"],
            retry=section["redis_retry"],
            key_prefix=section["redis_key_prefix"],
            on_error=section["on_backend_error"],
            max_tracked=section["max_tracked"],
            tls=tls,
            sentinels=section.get("redis_sentinel"),
        )


_ON_ERROR: dict[str, str | None] = {"local": BACKEND_LOCAL, "open": None, "closed": BACKEND_ERROR}
_ON_ERROR_TEXT = {
    "local": "to this process's own buckets",
    "open": "open (admitting)",
    "closed": "closed (refusing)",
}


class _Lease:
    """Tokens of one bucket held by this process."""

    __slots__ = ("empty_until", "expires", "grant", "pending", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.expires = 0.0
        self.empty_until = 0.0
        self.grant = 0
        """Counts the grants: a give-back entry of an earlier grant is stale."""
        self.pending: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class _Held:
    """A grant that may have tokens left when it ends."""

    expires: float
    grant: int
    lease: _Lease
    key: str
    rule: Rule


class RedisBuckets(Backend):
    """Token buckets in Redis, spent through local leases.

    Args:
        settings: from ``[plugin.ratelimit]``.
        clock: monotonic seconds (tests pass their own).

    Raises:
        ValueError: a TLS file cannot be used (the message names it).
    """

    def __init__(
        self, settings: RedisSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.address = parse_url(settings.url)
        tls = settings.tls if settings.tls is not None else TlsOptions()
        self.client = RespClient(
            self.address,
            tls.context() if self.address.tls else None,
            tls.server_name or None,
            settings.sentinels,
        )
        self.leases: LruTable[_Lease] = LruTable(settings.max_tracked)
        self._held: deque[_Held] = deque()
        self.calls = 0
        """Script calls made (the lease cache keeps this far below connections)."""
        self.given_back = 0
        """Unspent leased tokens given back to Redis."""
        self.errors = 0
        self.outages = 0
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._scope: trio.CancelScope | None = None
        self._stopped = False
        meter = metrics.get_meter("l4gw.ratelimit")
        self._m_errors = meter.create_counter(
            "l4gw.ratelimit.backend.errors", "{error}", "failed calls to the shared backend"
        )
        self._m_calls = meter.create_counter(
            "l4gw.ratelimit.backend.calls", "{call}", "calls to the shared backend"
        )

    def __str__(self) -> str:
        s = self.settings.sentinels
        if s is None:
            return str(self.address)
        return f'sentinel service "{s.service}" (db {self.address.db})'

    def tracked(self) -> int:
        return len(self.leases)

    def evictions(self) -> int:
        return self.leases.evictions

    # -- lifetime ------------------------------------------------------------------

    def start(self, nursery: Nursery) -> None:
        nursery.start_soon(self.run)

    def stop(self) -> None:
        """End :meth:`run`: unspent tokens go back, the connection closes."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Connect and load the script, then give back leases as they end; at
        cancellation (shutdown, :meth:`stop`) give back every unspent token."""
        with trio.CancelScope() as self._scope:
            if self._stopped:
                self._scope.cancel()
            try:
                await self._warm_up()
                tick = self.settings.lease_ttl / 2
                while True:
                    await trio.sleep(tick)
                    await self.give_back(everything=False)
            finally:
                # Shielded, and bounded like every call: the shutdown waits at most
                # redis_timeout for Redis.
                with trio.move_on_after(self.settings.timeout, shield=True):
                    await self.give_back(everything=True)
                self.client.close()

    async def _warm_up(self) -> None:
        """Connect and load the script before the first connection needs it."""
        reply = await self._call(("SCRIPT", "LOAD", SCRIPT), self.clock())
        if isinstance(reply, RespError):
            self._failed(str(reply))
        elif reply is not None:
            self._recovered()

    # -- leases -----------------------------------------------------------------------

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

    def _key(self, rule: Rule, key: str) -> str:
        return f"{self.settings.key_prefix}{rule.name}:{key}"

    async def _refill(self, need: list[tuple[Check, _Lease]], now: float) -> bool:
        """Fetch tokens for ``need`` (or wait for a fetch already under way).

        A lease that ended with tokens left gives them back in the same call.

        Returns:
            False when Redis could not be asked or did not answer.
        """
        waits = [lease.pending for _, lease in need if lease.pending is not None]
        mine = [(check, lease) for check, lease in need if lease.pending is None]
        if mine:
            event = trio.Event()
            keys: list[str] = []
            args: list[Any] = [self.settings.lease]
            returned = 0
            for (rule, key), lease in mine:
                lease.pending = event
                back, lease.tokens = max(0, lease.tokens), 0
                lease.grant += 1  # its give-back entry, if any, is settled here
                returned += back
                keys.append(self._key(rule, key))
                args += [repr(rule.rate), repr(rule.burst), back]
            try:
                reply = await self._script(keys, args, now)
            finally:
                for _, lease in mine:
                    lease.pending = None
                event.set()
            if reply is None:
                return False
            self.given_back += returned
            after = self.clock()
            for ((rule, _), lease), rkey, (granted, wait_ms) in zip(mine, keys, reply, strict=True):
                lease.tokens = int(granted)
                lease.expires = after + self.settings.lease_ttl
                if lease.tokens < 1:
                    lease.empty_until = after + min(int(wait_ms) / 1000, _MAX_EMPTY_CACHE)
                else:
                    lease.grant += 1
                    self._held.append(_Held(lease.expires, lease.grant, lease, rkey, rule))
        for pending in waits:
            await pending.wait()
        return True

    async def give_back(self, everything: bool = False) -> int:
        """Give the unspent tokens of ended leases back to Redis (of every lease
        with ``everything``).

        Returns:
            The tokens given back (0 when Redis did not take them: they are
            lost, as they would have been by expiring).
        """
        now = self.clock()
        batch: dict[str, tuple[Rule, int]] = {}
        while self._held:
            held = self._held[0]
            if held.expires > now and not everything:
                break
            self._held.popleft()
            lease = held.lease
            if lease.grant != held.grant or lease.tokens < 1:
                continue
            rule, back = batch.get(held.key, (held.rule, 0))
            batch[held.key] = (rule, back + lease.tokens)
            lease.tokens = 0
        if not batch:
            return 0
        args: list[Any] = [0]
        for rule, back in batch.values():
            args += [repr(rule.rate), repr(rule.burst), back]
        if await self._script(list(batch), args, now) is None:
            return 0
        returned = sum(back for _, back in batch.values())
        self.given_back += returned
        return returned

    # -- calls ------------------------------------------------------------------------

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
            if str(exc).startswith("READONLY"):
                # A primary turned replica (failover): ask the sentinels again.
                self.client.close()
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
            hint = ""
            if why.startswith(_AUTH_ERRORS):
                hint = "; check the user name and password of redis_url"
            elif why.startswith(_ACL_ERRORS):
                hint = (
                    "; the ACL user needs EVALSHA, EVAL and SCRIPT, and the keys "
                    f"{self.settings.key_prefix}*"
                )
            log.error(
                "ratelimit: redis %s unusable (%s%s): failing %s until it answers again",
                self,
                redact_text(why),
                hint,
                _ON_ERROR_TEXT[self.settings.on_error],
            )

    def _recovered(self) -> None:
        if self.down_since is not None:
            log.warning(
                "ratelimit: redis %s answers again after %.1fs",
                self,
                self.clock() - self.down_since,
            )
            self.down_since = None
