"""Per-flow byte counters shared by every relay tier, and a tier's counters.

The relay tiers (copy, splice, sockmap) update one :class:`RelayStats` in place
while bytes move, so the core can read progress at any time (idle policy,
promotion thresholds) and report the totals once in its close path.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RelayStats", "TierCounters"]


class RelayStats:
    """Mutable byte counters of one flow.

    Attributes:
        bytes_from_client: Bytes read from the client and written to the upstream.
        bytes_to_client: Bytes read from the upstream and written to the client.
    """

    __slots__ = ("bytes_from_client", "bytes_to_client")

    def __init__(self, bytes_from_client: int = 0, bytes_to_client: int = 0) -> None:
        self.bytes_from_client: int = bytes_from_client
        self.bytes_to_client: int = bytes_to_client

    def __repr__(self) -> str:
        return (
            f"RelayStats(bytes_from_client={self.bytes_from_client}, "
            f"bytes_to_client={self.bytes_to_client})"
        )


@dataclass(slots=True)
class TierCounters:
    """Flows and bytes of one relay tier in this process.

    Attributes:
        flows_now: Flows in this tier right now.
        flows_total: Flows that entered this tier (a promoted flow counts in
            ``copy`` and in the tier that took it over).
        bytes: Payload bytes moved while flows were in this tier (both directions).
    """

    flows_now: int = 0
    flows_total: int = 0
    bytes: int = 0
