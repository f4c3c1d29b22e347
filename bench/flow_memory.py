#!/usr/bin/env python3
"""What an idle relayed flow holds, allocation by allocation (tracemalloc).

``conn_cost.py idle`` measures RSS per held connection through a whole gateway; this
names where a flow's Python memory is. In one process it promotes ``--flows`` loopback
flows through the relay plugin's tiers the way the core does (awaiting the handover's
``then``; the tiers' ``relay`` where promotion is at once), exchanges 100 bytes each way
twice, ``--gap`` apart, so that each is measured and promoted, lets them settle, and
prints what they still hold per flow, grouped by the last frames of where it was
allocated. Each frame a flow awaits through while it idles shows as one coroutine's
allocation.

    .venv/bin/python bench/flow_memory.py --tier splice
    .venv/bin/python bench/flow_memory.py --tier sockmap --flows 1000   # BPF: root
    .venv/bin/python bench/flow_memory.py --relay 'sockmap_max_flows = 10'  # over the cap
    .venv/bin/python bench/flow_memory.py --quick --json out.json       # smoke

The sockets and the flow records are made before the first snapshot, so what is
counted is what relaying and idling cost. A measurement, not a test: numbers and what
they meant are in bench/README.md ("Two frames fewer per parked flow").
"""

from __future__ import annotations

import argparse
import gc
import socket
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script import interrupt_on_sigterm, write_report

from gateway.relay.tiers import RelayTiers
from gateway.testing import load_plugins, make_config, make_flow


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsn:
        near = socket.create_connection(lsn.getsockname())
        far, _ = lsn.accept()
    for s in (near, far):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return near, far


def _where(trace: tracemalloc.Traceback, depth: int) -> str:
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(trace)[-depth:])


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    tiers = RelayTiers()
    section = f'[plugin.relay]\ntiers = {args.tiers}\nstatus_dir = ""\n{args.relay}\n'
    tiers.configure(make_config(section, load_plugins(installed=True), configure=False))
    async with trio.open_nursery() as nursery:
        await tiers.startup(nursery)
    pairs = [(_pair(), _pair()) for _ in range(args.flows)]
    flows = [make_flow() for _ in range(args.flows)]
    ends = [
        (trio.socket.from_stdlib_socket(c), trio.socket.from_stdlib_socket(b))
        for (c, _), (_, b) in pairs
    ]
    for (_, gw_client), (gw_upstream, _) in pairs:
        gw_client.setblocking(False)
        gw_upstream.setblocking(False)

    async def relay(i: int) -> None:
        (_, gw_client), (gw_upstream, _) = pairs[i]
        then = tiers.handover.then if tiers.handover is not None else tiers.relay
        await then(flows[i], gw_client, gw_upstream, 3600)

    async def exchange(i: int) -> None:
        client, backend = ends[i]
        for sender, receiver in ((client, backend), (backend, client)):
            await sender.send(b"x" * 100)
            got = 0
            while got < 100:
                got += len(await receiver.recv(100 - got))

    async with trio.open_nursery() as nursery:
        gc.collect()
        tracemalloc.start(args.depth + 4)
        before = tracemalloc.take_snapshot()
        for i in range(args.flows):
            nursery.start_soon(relay, i)
        for _ in range(2):
            await trio.sleep(args.gap)
            for i in range(args.flows):
                await exchange(i)
        await trio.sleep(args.settle)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        in_tier = dict(Counter(str(f.tier) for f in flows))
        nursery.cancel_scope.cancel()
    for pair in pairs:
        for s in (*pair[0], *pair[1]):
            s.close()
    tiers.shutdown()
    stats = after.compare_to(before, "traceback")
    n = args.flows
    rows = [
        {
            "bytes_per_flow": round(st.size_diff / n),
            "objects_per_flow": round(st.count_diff / n, 2),
            "where": _where(st.traceback, args.depth),
        }
        for st in stats
        if abs(st.size_diff) / n >= args.min_bytes
    ]
    return {
        "flows": n,
        "in_tier": in_tier,
        "bytes_per_flow": round(sum(st.size_diff for st in stats) / n),
        "rows": rows[: args.top],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    # Not "copy": with no kernel tier the relay plugin leaves flows to the core's relay.
    p.add_argument("--tier", choices=("default", "sockmap", "splice"), default="default")
    p.add_argument("--relay", default="", help="more [plugin.relay] lines")
    p.add_argument("--flows", type=int, default=400, help="idle flows (400)")
    p.add_argument("--gap", type=float, default=0.3, help="seconds between exchanges (0.3)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds idle before counting (5)")
    p.add_argument("--depth", type=int, default=4, help="frames shown per row (4)")
    p.add_argument("--min-bytes", type=float, default=16, help="rows below this per flow hidden")
    p.add_argument("--top", type=int, default=30, help="rows shown (30)")
    p.add_argument("--quick", action="store_true", help="smoke: 20 flows, short waits")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    args.tiers = {
        "default": '["sockmap", "splice", "copy"]',
        "sockmap": '["sockmap", "copy"]',
        "splice": '["splice", "copy"]',
    }[args.tier]
    if args.quick:
        args.flows, args.gap, args.settle = 20, 0.05, 0.5
    interrupt_on_sigterm()
    report = trio.run(measure, args)
    print(
        f"{report['flows']} idle flows, in {report['in_tier']}: {report['bytes_per_flow']} B per flow"
    )
    print("| B per flow | objects | allocated at (oldest < newest frame) |\n|---|---|---|")
    for row in report["rows"]:
        print(f"| {row['bytes_per_flow']} | {row['objects_per_flow']} | {row['where']} |")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
