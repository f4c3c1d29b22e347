#!/usr/bin/env python3
"""CPU of the per-connection pipeline in process, without sockets: what l4gw's own
layers cost a connection, measured with little noise.

    .venv/bin/python bench/hook_cost.py                      # l4gw's own plugins
    .venv/bin/python bench/hook_cost.py --disable telemetry,ratelimit
    .venv/bin/python bench/hook_cost.py --src /tmp/ref       # another tree (A/B)

Each iteration is what the core does for one TCP connection around its syscalls: the
Flow, ``l4gw_connection_opened``, admit, route, routed, a successful
``l4gw_connect_attempt``, the relay offer (not run), and the close record
(``l4gw_connection_closed``, the log decision). The best of ``--repeat`` runs of
``--count`` iterations, in process CPU time.

In the gateway these layers cost three to four times what this reports: the gateway
used 55-67 µs more CPU per connection than the trio-lean reference (its machinery
without the layers) when this reported 16-17 µs (bench/README.md, "Where the rest
goes"); there, the syscalls between the steps evict the caches this loop keeps warm.
So it is a relative measure, for A/B of a change to the layers, not a share of the
per-connection CPU.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time

CONFIG = """
[[listener]]
name = "public"
bind = "127.0.0.1:0"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:9"]
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", help="import gateway and plugins from this tree")
    p.add_argument("--disable", default="", help="comma-separated plugins not to load")
    p.add_argument("--count", type=int, default=20000, help="iterations per run (20000)")
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is reported (5)")
    args = p.parse_args(argv)
    if args.src:
        sys.path.insert(0, args.src)

    import trio
    from peers import third_party_plugins

    from gateway.decisions import choose_route, refusal
    from gateway.flow import CloseReason, Flow, Route
    from gateway.relay.copy import CopyRelay
    from gateway.runtime import Runtime, next_flow_id, record_close
    from gateway.testing import load_plugins, make_config

    # The product as shipped: the example plugins a development venv installs are not.
    disabled = [d for d in args.disable.split(",") if d] + third_party_plugins()
    loaded = load_plugins(disabled=disabled)
    config = make_config(CONFIG, loaded, configure=False)
    # As the gateway configures them: the hooks a plugin declares idle left out (a
    # tree from before that, --src, calls every hook).
    if hasattr(loaded, "configure"):
        plugins = loaded.configure(config)
    else:
        loaded.call_all("l4gw_configure", config=config)
        plugins = loaded
    rt = Runtime(config, plugins, CopyRelay(65536), {})
    admit, routed = getattr(rt, "admit_hook", True), getattr(rt, "routed_hook", True)
    # As the core calls the hooks: by position since the sixth session (a --src tree
    # from before takes them by name only).
    by_position = any(
        p.kind is p.VAR_POSITIONAL for p in inspect.signature(refusal).parameters.values()
    )

    async def one(port: int) -> None:
        flow = Flow(next_flow_id(), "public", "tcp", ("127.0.0.1", port), ("127.0.0.1", 8080))
        rt.flows[flow.id] = flow
        plugins.opened(flow)
        if admit:
            await refusal(rt, flow, "l4gw_admit")
        route = await choose_route(rt, flow)
        assert isinstance(route, Route), route
        endpoint = route.endpoints[0]
        if by_position:
            if routed:
                await refusal(rt, flow, "l4gw_routed", route)
            plugins.observe("l4gw_connect_attempt", flow, endpoint, None, 0.0001)
            offer = plugins.offer("l4gw_relay", flow, None, None, 30.0)
        else:
            if routed:
                await refusal(rt, flow, "l4gw_routed", route=route)
            plugins.observe(
                "l4gw_connect_attempt", flow=flow, endpoint=endpoint, error=None, seconds=0.0001
            )
            offer = plugins.offer(
                "l4gw_relay", flow=flow, client=None, upstream=None, idle_timeout=30.0
            )
        if offer is not None and inspect.iscoroutine(offer[1]):
            offer[1].close()  # the relay's coroutine: not run here
        flow.bytes_from_client, flow.bytes_to_client, flow.tier = 100, 600, "copy"
        flow.close_reason = CloseReason.CLIENT_EOF
        del rt.flows[flow.id]
        record_close(rt, flow)

    async def startup(nursery: trio.Nursery) -> None:
        # As the gateway starts: the telemetry recorder, the relay tiers, ... (their
        # background tasks run in ``nursery`` and are cancelled at the end).
        for _, result in plugins.call_all("l4gw_startup", config=rt.config, nursery=nursery):
            if result is not None:
                await result

    async def run() -> float:
        best = float("inf")
        async with trio.open_nursery() as nursery:
            await startup(nursery)
            best = await measure()
            nursery.cancel_scope.cancel()
        return best

    async def measure() -> float:
        best = float("inf")
        for _ in range(args.repeat):
            gc.collect()
            start = time.process_time()
            for i in range(args.count):
                await one(40000 + i % 20000)
            best = min(best, (time.process_time() - start) / args.count)
        return best

    best = trio.run(run)
    print(
        f"{best * 1e6:.2f} µs per connection (pipeline in process), plugins: "
        + ", ".join(i.name for i in plugins.infos)
        + "".join(
            f"; {name} idle in {', '.join(sorted(hooks))}"
            for name, hooks in sorted(getattr(plugins, "idle", {}).items())
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
