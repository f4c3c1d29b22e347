"""Token buckets on plain values, and what a bucket store offers the plugin.

Shared by the plugin (:mod:`l4gw_plugins.ratelimit.plugin`) and the Redis store
(:mod:`l4gw_plugins.ratelimit.redis`), which imports it and nothing of the plugin.

Rules kept here:

* **Decisions apart from I/O.** :class:`TokenBucket`, :class:`LruTable` and
  :class:`MemoryBuckets` are plain values on an explicit clock; nothing here
  does I/O, reads a clock or imports trio.
* **Bounded memory.** Buckets live in one :class:`LruTable` capped at
  ``max_tracked``; the least recently used bucket is evicted first (an evicted
  client starts again with a full bucket).
* **A connection takes a token from every bucket that applies, or from none**
  (:meth:`MemoryBuckets.acquire`): all are checked before any is taken, so a
  refusal by one rule does not cost the client tokens of the others.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

BACKEND_ERROR = "backend_error"
"""The rule name of a refusal because the shared backend was unreachable
(``on_backend_error = "closed"``)."""
BACKEND_LOCAL = "backend_local"
"""What the shared backend answers when it is unreachable and ``on_backend_error =
"local"``: decide with this process's own buckets (each gateway then enforces the
limit alone: never open, at most N times the limit over N gateways)."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where the shared buckets live, from ``redis_url``."""

    host: str
    port: int
    username: str | None
    password: str | None
    db: int
    tls: bool = False
    """``rediss://``: TLS to Redis (and to the sentinels)."""

    def __str__(self) -> str:
        # Never the credentials: this is what log lines show.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


# Said without "user:password@" after the scheme, which redaction would mask.
_URL_FORM = (
    '"redis://host[:port][/db]" (with "user:password@" or ":password@" before the host; '
    '"rediss://" for TLS)'
)


def parse_url(url: str) -> RedisAddress:
    """Parse ``redis[s]://[[user]:password@]host[:port][/db]`` (percent-escapes decoded).

    A message quotes only what cannot hold a part of the password: the scheme,
    and a port or db when no ``@`` follows the host.

    Raises:
        ValueError: not a redis:// URL, or a bad host, port or db.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme.isascii() or not scheme.replace("+", "").isalnum():
        raise ValueError(f"expected {_URL_FORM}")
    if scheme.lower() not in ("redis", "rediss"):
        raise ValueError(f'expected {_URL_FORM}, got a "{scheme}://" URL')
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit's own message may quote the userinfo.
        raise ValueError(
            'the host is not an address or name (an IPv6 address is written "[::1]"; '
            '"[" and "]" in a password must be percent-encoded as %5B and %5D)'
        ) from None
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        raise ValueError(
            '"@" after the host: percent-encode "/", "?" and "#" in the password (%2F, %3F, %23)'
        )
    if parts.query or parts.fragment:
        raise ValueError(f'unexpected "?" or "#" part: expected {_URL_FORM}')
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        hostport = parts.netloc.rpartition("@")[2]
        text = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
        text = text.rpartition(":")[2]
        shown = f' "{text}"' if text.isdigit() else ""
        raise ValueError(f"invalid port{shown} (1 to 65535)")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError(f'invalid db "{path}" (a number)')
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=port or 6379,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=int(path) if path else 0,
        tls=scheme.lower() == "rediss",
    )


@dataclass(frozen=True, slots=True)
class Rule:
    """One token-bucket rule.

    Attributes:
        name: the config key ("per_client", ...): the refusal's rule.
        rate: tokens added per second.
        burst: bucket size.
    """

    name: str
    rate: float
    burst: float

    @classmethod
    def from_config(cls, name: str, table: Mapping[str, Any]) -> Rule:
        return cls(name, table["rate"] / table["per"], float(table["burst"] or table["rate"]))


class TokenBucket:
    """A bucket that starts full and refills continuously."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, now: float, rule: Rule) -> float:
        """Add what accrued since the last refill; return the tokens available."""
        if now > self.stamp:
            self.tokens = min(rule.burst, self.tokens + (now - self.stamp) * rule.rate)
            self.stamp = now
        return self.tokens


V = TypeVar("V")


class LruTable(Generic[V]):
    """A dict with a size cap that evicts the least recently used entry.

    Args:
        cap: most entries kept.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.evictions = 0
        self._items: OrderedDict[Any, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: Any, make: Callable[[], V]) -> V:
        """The entry for ``key`` (made by ``make`` if absent), now most recent."""
        items = self._items
        value = items.get(key)
        if value is not None:
            items.move_to_end(key)
            return value
        value = items[key] = make()
        while len(items) > self.cap:
            items.popitem(last=False)
            self.evictions += 1
        return value


Check = tuple[Rule, str]
"""A rule and the key it applies to ("127.0.0.2", "198.51.100.0/24", "api")."""


class MemoryBuckets:
    """Token buckets of this process.

    Args:
        max_tracked: the LRU table's cap.
    """

    def __init__(self, max_tracked: int) -> None:
        self.table: LruTable[TokenBucket] = LruTable(max_tracked)

    def acquire(self, checks: Iterable[Check], now: float) -> Rule | None:
        """Take one token from each bucket, or none.

        Returns:
            None when admitted, else the first rule whose bucket is empty.
        """
        taken: list[TokenBucket] = []
        for rule, key in checks:
            bucket = self.table.get((rule.name, key), partial(TokenBucket, rule.burst, now))
            if bucket.refill(now, rule) < 1.0:
                return rule
            taken.append(bucket)
        for bucket in taken:
            bucket.tokens -= 1.0
        return None


def client_prefix(ip: str, v4: int, v6: int) -> str:
    """The client's network at the configured prefix length, as "a.b.c.0/24".

    With socket's C functions rather than ipaddress: this runs for every
    connection, and ``ip_network`` costs several times more.
    """
    family, bits, length = (socket.AF_INET6, 128, v6) if ":" in ip else (socket.AF_INET, 32, v4)
    value = int.from_bytes(socket.inet_pton(family, ip), "big")
    shift = bits - length
    network = ((value >> shift) << shift).to_bytes(bits // 8, "big")
    return f"{socket.inet_ntop(family, network)}/{length}"


class Nursery(Protocol):
    """Where a backend starts its background work (a ``trio.Nursery``)."""

    def start_soon(self, async_fn: Callable[[], Awaitable[object]], /) -> None: ...


class Backend:
    """What a shared bucket store offers the plugin (:mod:`l4gw_plugins.ratelimit.redis`)."""

    async def acquire(self, checks: list[Check]) -> str | None:
        """None when admitted, else the refusing rule's name (or BACKEND_ERROR)."""
        raise NotImplementedError

    def start(self, nursery: Nursery) -> None:
        """Start background work, if any."""

    def stop(self) -> None:
        """End the background work (a reload replaced this store); give back what it holds."""

    def tracked(self) -> int:
        return 0

    def evictions(self) -> int:
        return 0
