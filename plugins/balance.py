"""Load balancing: the order in which a new connection tries a cluster's endpoints.

Pure decisions on plain values. A balancer gets the *candidates* (the
endpoints that may take new connections: healthy, not ejected, weight above
zero; the caller filters), a function giving each endpoint's active
connection count, the client's address as packed bytes, and how many
endpoints the core may try. It returns them in try order: the chosen one
first, then the fallbacks the core retries when a connect fails. No I/O and
no clock, so the unit tests drive every algorithm with plain values.

Rules kept here:

* **Weights count everywhere.** Round robin is nginx's smooth weighted round
  robin (an endpoint of weight 3 gets 3 of every 4 picks, interleaved, not
  in a burst); least_conn and random_two compare ``active / weight``;
  maglev gives each endpoint table slots in proportion to its weight.
* **Stable hashes.** Maglev hashes with BLAKE2b, never Python's ``hash()``
  (randomised per process): every gateway process and host must send a
  client to the same endpoint.
* **Minimal disruption.** Maglev's table is built from the configured
  endpoints only (a config change rebuilds it: Maglev moves about 1/N of
  the clients when one of N endpoints leaves). An endpoint that is merely
  unhealthy keeps its slots: its clients walk forward to the next available
  slot and everybody else stays where they were.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Sequence
from typing import Final, Generic, Protocol, TypeVar

from gateway import Endpoint

Load = Callable[[Endpoint], int]
"""Active connections of an endpoint (as the routing plugin counts them)."""

MAGLEV_TABLE_SIZE: Final = 65537
"""A prime, so every skip value walks the whole table (Maglev paper, §3.4)."""

_FALLBACK_WALK: Final = 4096
"""Table slots maglev walks looking for fallbacks before taking the rest in
list order (an endpoint of tiny weight has few slots)."""


class Balancer(Protocol):
    """What the routing plugin asks a cluster's balancer."""

    def order(
        self, candidates: Sequence[Endpoint], load: Load, client: bytes, count: int
    ) -> tuple[Endpoint, ...]:
        """The endpoints to try, chosen first; at most ``count`` of them.

        Args:
            candidates: endpoints that may take new connections (non-empty,
                every weight above zero).
            load: active connections per endpoint.
            client: the client's IP address, packed (4 or 16 bytes).
            count: how many endpoints the core will try at most (>= 1).
        """
        ...


class Weighted(Protocol):
    """Anything with a weight: endpoints, and a route's clusters."""

    @property
    def weight(self) -> int: ...


W = TypeVar("W", bound=Weighted)


class SmoothWeighted(Generic[W]):
    """nginx's smooth weighted round robin over any weighted, hashable items.

    Each pick adds every candidate's weight to its running score, takes the
    highest, and subtracts the total from the winner: over any window of
    ``sum(weights)`` picks each item gets exactly its weight, spread out
    (5:1:1 gives a a b a c a a). Items missing from one call keep their score.
    """

    def __init__(self) -> None:
        self.score: dict[W, int] = {}

    def pick(self, candidates: Sequence[W]) -> W:
        if len(candidates) == 1:
            # Its score would gain its weight and lose the same total: unchanged.
            return candidates[0]
        score = self.score
        total = 0
        best = candidates[0]
        best_score: int | None = None
        for item in candidates:
            s = score.get(item, 0) + item.weight
            score[item] = s
            total += item.weight
            if best_score is None or s > best_score:
                best, best_score = item, s
        score[best] -= total
        return best


class SmoothRoundRobin:
    """The ``round_robin`` balancer: smooth weighted round robin."""

    def __init__(self) -> None:
        self._rr: SmoothWeighted[Endpoint] = SmoothWeighted()

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        return self._rr.pick(candidates)

    def order(
        self, candidates: Sequence[Endpoint], load: Load, client: bytes, count: int
    ) -> tuple[Endpoint, ...]:
        best = self._rr.pick(candidates)
        if count == 1 or len(candidates) == 1:
            return (best,)
        # Fallbacks: the ones the next picks would choose (highest score first).
        score = self._rr.score
        rest = heapq.nlargest(count - 1, _rest(candidates, best), key=lambda e: score.get(e, 0))
        return (best, *rest)


def _rest(candidates: Sequence[Endpoint], *taken: Endpoint) -> list[Endpoint]:
    """``candidates`` without one occurrence of each taken endpoint.

    By position, not by value: an endpoint listed twice in a cluster is
    tried twice (a config may repeat one to retry it).
    """
    rest = list(candidates)
    for e in taken:
        rest.remove(e)
    return rest


def _less_loaded(a: Endpoint, b: Endpoint, load: Load) -> bool:
    """load(a)/weight(a) < load(b)/weight(b), without floats."""
    return load(a) * b.weight < load(b) * a.weight


class LeastConn:
    """Fewest active connections relative to weight; ties by smooth round robin.

    The tie-break matters: when connections are short, every load is 0 and a
    plain "first minimum" would send everything to one endpoint.
    """

    def __init__(self) -> None:
        self._ties: SmoothWeighted[Endpoint] = SmoothWeighted()

    def order(
        self, candidates: Sequence[Endpoint], load: Load, client: bytes, count: int
    ) -> tuple[Endpoint, ...]:
        loads = {e: load(e) for e in candidates}
        best: list[Endpoint] = []
        for e in candidates:
            if not best:
                best.append(e)
                continue
            lhs, rhs = loads[e] * best[0].weight, loads[best[0]] * e.weight
            if lhs < rhs:
                best = [e]
            elif lhs == rhs:
                best.append(e)
        chosen = best[0] if len(best) == 1 else self._ties.pick(best)
        if count == 1 or len(candidates) == 1:
            return (chosen,)
        rest = heapq.nsmallest(
            count - 1, _rest(candidates, chosen), key=lambda e: loads[e] / e.weight
        )
        return (chosen, *rest)


class RandomTwo:
    """Power of two choices: two endpoints drawn by weight, the less loaded wins.

    With equal loads the first draw wins, so idle clusters split by weight;
    under load the comparison steers away from busy endpoints.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def order(
        self, candidates: Sequence[Endpoint], load: Load, client: bytes, count: int
    ) -> tuple[Endpoint, ...]:
        if len(candidates) == 1:
            return (candidates[0],)
        rng = self._rng
        weights = [e.weight for e in candidates]
        first = rng.choices(range(len(candidates)), weights)[0]
        # Draw the second among the others, by weight too.
        weights_other = weights.copy()
        weights_other[first] = 0
        second = rng.choices(range(len(candidates)), weights_other)[0]
        a, b = candidates[first], candidates[second]
        chosen, other = (b, a) if _less_loaded(b, a, load) else (a, b)
        if count == 1:
            return (chosen,)
        rest = [e for i, e in enumerate(candidates) if i != first and i != second]
        rng.shuffle(rest)
        return (chosen, other, *rest)[:count]


def stable_hash(data: bytes, salt: bytes = b"") -> int:
    """64-bit BLAKE2b: the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "big")


def maglev_table(endpoints: Sequence[Endpoint], size: int = MAGLEV_TABLE_SIZE) -> list[int]:
    """Build a Maglev lookup table: ``table[slot]`` is an index into ``endpoints``.

    Each endpoint walks its own permutation of the slots (offset and skip
    from hashes of its address, so they do not depend on list order) and
    claims the next free slot on its turn. Weighted: in each round an
    endpoint earns ``weight / max_weight`` of a turn, so slots end up
    proportional to weights. Endpoints of weight 0 get no slot.

    Args:
        endpoints: the cluster's configured endpoints.
        size: table size, a prime larger than the number of endpoints.

    Returns:
        The table; empty when no endpoint has a weight.
    """
    members = [i for i, e in enumerate(endpoints) if e.weight > 0]
    if not members:
        return []
    max_weight = max(endpoints[i].weight for i in members)
    offset = []
    skip = []
    for i in members:
        key = str(endpoints[i]).encode()
        offset.append(stable_hash(key, b"offset") % size)
        skip.append(stable_hash(key, b"skip") % (size - 1) + 1)
    share = [endpoints[i].weight / max_weight for i in members]
    credit = [0.0] * len(members)
    tried = [0] * len(members)
    table = [-1] * size
    filled = 0
    while True:
        for m, index in enumerate(members):
            credit[m] += share[m]
            if credit[m] < 1.0:
                continue
            credit[m] -= 1.0
            o, s, j = offset[m], skip[m], tried[m]
            slot = (o + j * s) % size
            while table[slot] >= 0:
                j += 1
                slot = (o + j * s) % size
            tried[m] = j + 1
            table[slot] = index
            filled += 1
            if filled == size:
                return table


class Maglev:
    """Consistent hashing on the client address (Maglev, Eisenbud et al., NSDI 2016).

    Args:
        endpoints: the cluster's configured endpoints, the table's members.
        size: table size (a prime).
    """

    def __init__(self, endpoints: Sequence[Endpoint], size: int = MAGLEV_TABLE_SIZE) -> None:
        self.endpoints = tuple(endpoints)
        self.size = size
        self._table = maglev_table(self.endpoints, size)

    def lookup(self, client: bytes) -> Endpoint | None:
        """The endpoint a client maps to when every endpoint is available."""
        if not self._table:
            return None
        return self.endpoints[self._table[stable_hash(client) % self.size]]

    def order(
        self, candidates: Sequence[Endpoint], load: Load, client: bytes, count: int
    ) -> tuple[Endpoint, ...]:
        want = min(count, len(candidates))
        available = set(candidates)
        out: list[Endpoint] = []
        table, endpoints, size = self._table, self.endpoints, self.size
        if table:
            slot = stable_hash(client) % size
            found_at = 0
            for step in range(size):
                e = endpoints[table[(slot + step) % size]]
                if e in available and e not in out:
                    if not out:
                        found_at = step
                    out.append(e)
                    if len(out) == want:
                        return tuple(out)
                elif out and step - found_at >= _FALLBACK_WALK:
                    break
        return (*out, *_rest(candidates, *out))[:want]


LOAD_AWARE: Final = frozenset({"least_conn", "random_two"})
"""The ``balance`` algorithms whose order reads the active connections (``load``):
only for them does the routing plugin count connections per endpoint."""


def make_balancer(algorithm: str, endpoints: Sequence[Endpoint]) -> Balancer:
    """The balancer for a cluster's ``balance`` setting.

    Raises:
        ValueError: an unknown algorithm (the config schema prevents it).
    """
    if algorithm == "round_robin":
        return SmoothRoundRobin()
    if algorithm == "least_conn":
        return LeastConn()
    if algorithm == "random_two":
        return RandomTwo()
    if algorithm == "maglev":
        return Maglev(endpoints)
    raise ValueError(f"unknown balance algorithm {algorithm!r}")
