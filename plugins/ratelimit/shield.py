"""``shield_after``: a client the limiter keeps refusing goes into the eBPF shield.

``shield_after = { refusals = 20, per = "10s", ttl = "2m" }``: a client
address refused ``refusals`` times within ``per`` (by ``per_client``,
``per_prefix`` or ``max_connections_per_client``) is put in the shield for
``ttl`` (source ``ratelimit``); from then on the kernel drops its SYNs
before the gateway accepts them, which a flood of refusals would otherwise
cost a worker (about 250 µs of CPU each). When the TTL ends the client is
served again, and shielded again if it goes on.

Rules kept here:

* **Only the client's own refusals count.** A ``per_listener`` or
  ``per_route`` refusal says the gateway is busy, not that this client
  misbehaves, and a Redis outage (``backend_error``) is nobody's fault:
  neither counts, or one busy listener would shield every client.
* **TCP refusals only.** A TCP client was refused after its handshake, so its
  address is its own; a UDP datagram's source can be forged, and counting it
  would let anyone get a third party shielded.
* **The address, not the prefix**: a ``per_prefix`` refusal counts for the
  refused address only; the shield takes /32 and /128 entries from here.
* **Counted per process**, like the ``memory`` buckets: with ``workers = N``
  a client spread over the workers by SO_REUSEPORT is shielded once one
  worker saw ``refusals`` of its refusals (at most N times as many in all).
  The entry itself is the gateway's (every worker shares the table).
* **Enforced in admit as well.** While the kernel shield is off (or before
  its drop takes effect) a client the limiter shielded is refused in
  ``l4gw_admit`` (rule ``shield``) without taking tokens.
* **Bounded.** Refusal windows are kept for at most ``max_tracked`` clients
  (the oldest window is dropped first); a client the shield refuses (the
  never-list: a PROXY-protocol balancer, the gateway itself) is warned about
  once per ``ttl``.
* Plain values on an explicit clock; the shield is called only when a
  window fills.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import Field, Flow, Invalid, Refusal, shield
from gateway import schema as s

log = logging.getLogger("l4gw.ratelimit")

SOURCE = "ratelimit"
COUNTED_RULES = frozenset({"per_client", "per_prefix", "max_connections_per_client"})


def _threshold_table() -> Callable[[Any], dict[str, Any]]:
    schema = {
        "refusals": Field(s.integer(1), doc="refusals of one client address that shield it"),
        "per": Field(s.positive_duration, doc='within this time ("10s")'),
        "ttl": Field(s.positive_duration, doc='for this long ("2m")'),
    }
    table = s.table(schema)

    def convert(value: Any) -> dict[str, Any]:
        """The ``shield_after`` inline table: every key required, durations above 0s."""
        rule: dict[str, Any] = table(value)
        if rule["per"] <= 0 or rule["ttl"] <= 0:
            raise Invalid("per and ttl must be longer than 0s")
        return rule

    return convert


FIELD = Field(
    _threshold_table(),
    None,
    "put a client refused `refusals` times within `per` in the eBPF shield for `ttl` "
    '(e.g. { refusals = 20, per = "10s", ttl = "2m" }; off when absent)',
)


@dataclass(frozen=True, slots=True)
class Threshold:
    refusals: int
    per: float
    ttl: float

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Threshold | None:
        rule = section.get("shield_after")
        return None if not rule else cls(rule["refusals"], rule["per"], rule["ttl"])


AdmitResult = Refusal | Awaitable[Refusal | None] | None


class ShieldAfter:
    """Counts each client's refusals and shields it at the threshold.

    Args:
        clock: monotonic seconds.
        cap: most clients whose refusals are counted at once.
    """

    def __init__(self, clock: Callable[[], float], cap: int = 100_000) -> None:
        self.clock = clock
        self.cap = cap
        self.threshold: Threshold | None = None
        self.windows: dict[str, tuple[float, int]] = {}
        """Client address -> (start of its window, refusals in it)."""
        self._warned: dict[str, float] = {}
        self.shielded = 0
        self.reset = True

    def configure(self, section: Mapping[str, Any]) -> None:
        self.threshold = Threshold.from_config(section)
        self.cap = section.get("max_tracked", self.cap)
        self.reset = section.get("refuse_with", "rst") == "rst"
        if self.threshold is None:
            self.windows.clear()

    def admit(self, flow: Flow, decide: Callable[[Flow], AdmitResult]) -> AdmitResult:
        """``decide(flow)`` (the limiter), with the shield in front and the count behind."""
        if self.threshold is None:
            return decide(flow)
        ip = flow.client[0]
        entry = shield.lookup(ip)
        if entry is not None and entry.source == SOURCE:
            return Refusal(
                f"shielded {entry.network} ({entry.reason})", rule="shield", reset=self.reset
            )
        result = decide(flow)
        if result is None or flow.transport != "tcp":
            return result
        if isinstance(result, Refusal):
            self.refused(ip, result.rule)
            return result
        return self._after(ip, result)

    async def _after(self, ip: str, pending: Awaitable[Refusal | None]) -> Refusal | None:
        result = await pending
        if result is not None:
            self.refused(ip, result.rule)
        return result

    def refused(self, ip: str, rule: str) -> bool:
        """Count a refusal of ``ip`` by ``rule``; True when it shielded the client."""
        threshold = self.threshold
        if threshold is None or rule not in COUNTED_RULES:
            return False
        now = self.clock()
        start, count = self.windows.pop(ip, (now, 0))
        if now - start > threshold.per:
            start, count = now, 0
        count += 1
        if count < threshold.refusals:
            self.windows[ip] = (start, count)  # re-inserted: the dict's order is by last refusal
            while len(self.windows) > self.cap:
                del self.windows[next(iter(self.windows))]
            return False
        reason = f"rate limited: {count} refusals in {threshold.per:g}s ({rule})"
        try:
            shield.add(ip, threshold.ttl, reason, source=SOURCE)
        except shield.ShieldRefused as exc:
            if self._warned.get(ip, -1e18) + threshold.ttl <= now:
                self._warned[ip] = now
                while len(self._warned) > self.cap:
                    del self._warned[next(iter(self._warned))]
                log.warning("ratelimit: %s crossed shield_after but %s", ip, exc.reason)
            return False
        self.shielded += 1
        return True
