#!/usr/bin/env python3
"""What the shared rate limiter costs on its own path: Redis calls and CPU per acquire.

Runs :class:`l4gw_plugins.ratelimit.redis.RedisBuckets` (the leases, the script,
the RESP client) against a throwaway ``redis-server`` on loopback, in this process,
for a fixed count of acquires per case, and reports what does not depend on how
busy the machine is: Redis calls per admitted connection, and CPU µs
(utime+stime of this process: Redis's own time is not counted) per acquire.

    .venv/bin/python bench/ratelimit_redis.py --acquires 2000

Cases: burst 5 over 200 clients (leased one token at a time: a call per admitted
connection), burst 100 over 10 clients, burst 1000 for one client (leases of
``redis_lease`` = 5 until the bucket runs low). The redis-server is stopped on exit.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

from redisproc import RedisServer  # noqa: E402

from l4gw_plugins.ratelimit.buckets import Rule  # noqa: E402
from l4gw_plugins.ratelimit.redis import RedisBuckets, RedisSettings  # noqa: E402

CASES = ((5, 200), (100, 10), (1000, 1))
"""(burst, clients); the rate is the burst per second."""


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(url: str, acquires: int) -> None:
    for burst, clients in CASES:
        settings = RedisSettings(url, 1.0, 5, 1.0, 1.0, f"bench{burst}:", "closed", 100_000)
        buckets = RedisBuckets(settings)
        rule = Rule("per_client", float(burst), float(burst))
        admitted = 0
        before = cpu()
        for i in range(acquires):
            if await buckets.acquire([(rule, f"10.0.{i % clients // 256}.{i % 256}")]) is None:
                admitted += 1
        used = cpu() - before
        buckets.client.close()
        print(
            f"burst {burst:5} clients {clients:4}: {acquires} acquires, {admitted} admitted, "
            f"{buckets.calls} Redis calls ({buckets.calls / max(admitted, 1):.2f} per admitted), "
            f"{1e6 * used / acquires:.0f} µs CPU per acquire"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acquires", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="l4gw-bench-rl-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            trio.run(run, server.url, min(args.acquires, 100_000))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
