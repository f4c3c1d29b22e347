"""gateway.relay.tiers: one process's tiers moving real loopback flows (copy and splice;
the sockmap tier end to end is tests/e2e/test_relay_tiers.py)."""

from __future__ import annotations

import contextlib
import os
import resource
from typing import Any

import pytest
import trio
from coroutines import awaited_through
from trio.testing import wait_all_tasks_blocked

from gateway.flow import CloseReason
from gateway.relay import poller
from gateway.relay.pipes import KEEP
from gateway.relay.tiers import RelayTiers
from gateway.testing import load_plugins, make_config, make_flow

from relay_helpers import exchange, first_mismatch, payload, recv_exact, send_all, topology

MiB = 1 << 20


def configured(section: str) -> RelayTiers:
    """Tiers configured by ``[plugin.relay]`` ``section`` (through the relay plugin's schema)."""
    tiers = RelayTiers()
    plugins = load_plugins(installed=True)
    tiers.configure(make_config(f"[plugin.relay]\n{section}\n", plugins, configure=False))
    return tiers


async def relay_one(tiers: RelayTiers, up: bytes, down: bytes) -> dict[str, Any]:
    flow = make_flow()
    out: dict[str, Any] = {"flow": flow}
    with topology() as topo, trio.fail_after(30):

        async def run() -> None:
            out["reason"] = await tiers.relay(flow, topo.gw_client, topo.gw_upstream, 10)
            topo.close_gateway()

        async with trio.open_nursery() as n:
            n.start_soon(run)
            out["at_backend"], out["at_client"] = await exchange(topo, up, down)
    assert out["at_backend"] == up, first_mismatch(out["at_backend"], up)
    assert out["at_client"] == down, first_mismatch(out["at_client"], down)
    return out


async def start(tiers: RelayTiers) -> None:
    async with trio.open_nursery() as nursery:
        await tiers.startup(nursery)


@pytest.mark.timeout(60)
async def test_a_flow_is_promoted_from_copy_to_splice_and_counted_in_both() -> None:
    tiers = configured('tiers = ["splice"]\npromote_after_bytes = "64KiB"\nstatus_dir = ""')
    await start(tiers)
    assert tiers.plan == ("splice",)
    up, down = payload(2 * MiB, 1), payload(MiB + 5, 2)
    out = await relay_one(tiers, up, down)
    flow = out["flow"]
    assert out["reason"] in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)
    assert (flow.bytes_from_client, flow.bytes_to_client) == (len(up), len(down))
    assert flow.tier == "splice"
    (spliced,) = [attrs for name, attrs in flow.events if name == "spliced"]
    assert spliced["tier"] == "splice" and spliced["bytes_before"] > 0
    st = tiers.status()
    assert tiers.promotions == 1 and st["promotions"] == 1
    copy, splice = st["tiers"]["copy"], st["tiers"]["splice"]
    assert (copy["flows_total"], splice["flows_total"]) == (1, 1)
    assert copy["flows_now"] == splice["flows_now"] == 0
    assert copy["bytes"] + splice["bytes"] == len(up) + len(down)
    # Its pipes went back to the run's pool as they emptied (splice.py rule 2).
    assert splice["pipes"]["lent"] == 0 and 1 <= splice["pipes"]["free"] <= KEEP
    assert splice["pipes"]["refused"] == 0
    tiers.shutdown()
    assert tiers.plan == ()


@pytest.mark.timeout(60)
async def test_a_short_flow_never_leaves_copy() -> None:
    tiers = configured('tiers = ["splice"]\nstatus_dir = ""')
    await start(tiers)
    out = await relay_one(tiers, b"ping", b"pong")
    assert out["flow"].tier == "copy" and tiers.promotions == 0
    assert tiers.status()["tiers"]["splice"]["flows_total"] == 0


async def test_without_a_started_kernel_tier_there_is_no_plan() -> None:
    tiers = configured('tiers = ["splice"]')
    assert tiers.plan == ()  # configured, not probed yet
    copy_only = configured('tiers = ["copy"]\nstatus_dir = ""')
    await start(copy_only)
    assert copy_only.plan == ()
    assert copy_only.status()["tiers"]["splice"]["why_not"] == "not in [plugin.relay] tiers"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tier", ["splice"])
async def test_out_of_descriptors_for_a_kernel_tier_the_flow_stays_in_copy(tier: str) -> None:
    """Near the fd limit (many held flows), splice cannot make a pipe: the flow goes on
    in copy, which needs no descriptor of its own, instead of failing. (The sockmap tier
    needs none either: test_sockmap.py T27.)"""
    tiers = configured(f'tiers = ["{tier}"]\npromote_after_bytes = "64KiB"\nstatus_dir = ""')
    await start(tiers)
    assert tiers.plan == (tier,), tiers.status()
    poller.current()  # the copy tier's epoll set exists before the descriptors run out
    up, down = payload(MiB, 3), payload(MiB + 7, 4)
    flow = make_flow()
    out: dict[str, Any] = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    with topology() as topo, trio.fail_after(30):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(_open_fds()) + 1, hard))
            with contextlib.suppress(OSError):
                while True:  # the holes below the limit too
                    filler.append(os.open("/dev/null", os.O_RDONLY))

            async def run() -> None:
                out["reason"] = await tiers.relay(flow, topo.gw_client, topo.gw_upstream, 10)
                topo.close_gateway()

            async with trio.open_nursery() as n:
                n.start_soon(run)
                at_backend, at_client = await exchange(topo, up, down)
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert filler, "no descriptor was free to fill"
    assert at_backend == up, first_mismatch(at_backend, up)
    assert at_client == down, first_mismatch(at_client, down)
    assert out["reason"] in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)
    assert flow.tier == "copy" and tiers.fallbacks == 1
    (fallback,) = [attrs for name, attrs in flow.events if name == "relay_fallback"]
    assert fallback["tier"] == tier and "Too many open files" in fallback["reason"]
    tiers.shutdown()


def _open_fds() -> list[int]:
    return [int(fd) for fd in os.listdir("/proc/self/fd")]


NEEDS_BPF = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root for BPF"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tier", ["splice", pytest.param("sockmap", marks=NEEDS_BPF)])
async def test_an_idle_promoted_flow_keeps_only_its_tiers_frames(tier: str) -> None:
    """A flow idles in a kernel tier for most of its life, and each frame it awaits
    through is held all that time (300–700 bytes each: bench/README.md). Promoted the
    way the core does it (awaiting the handover's ``then``), it holds the tiers' own
    frame, the tier's relay and the park only: no frame of ``promoted``, of a watchdog
    apart from the accelerator's ``relay`` or of trio's ``wait_task_rescheduled``; and
    it still relays byte-exact afterwards."""
    tiers = configured(f'tiers = ["{tier}"]\npromote_after = "10ms"\nstatus_dir = ""')
    await start(tiers)
    assert tiers.plan == (tier,) and tiers.handover is not None
    flow = make_flow()
    task: list[trio.lowlevel.Task] = []
    with topology() as topo, trio.fail_after(30):

        async def run() -> None:
            task.append(trio.lowlevel.current_task())
            assert tiers.handover is not None
            await tiers.handover.then(flow, topo.gw_client, topo.gw_upstream, 10)
            topo.close_gateway()

        async with trio.open_nursery() as n:
            n.start_soon(run)
            while flow.tier != tier:
                await trio.sleep(0.01)
            await wait_all_tasks_blocked()
            expected = {
                "sockmap": ["_kernel", "relay", "park"],
                "splice": ["_kernel", "splice_relay", "park"],
            }
            assert awaited_through(task[0].coro)[1:] == expected[tier]
            at_backend, at_client = await exchange(topo, payload(MiB, 5), payload(MiB + 3, 6))
    assert at_backend == payload(MiB, 5), first_mismatch(at_backend, payload(MiB, 5))
    assert at_client == payload(MiB + 3, 6), first_mismatch(at_client, payload(MiB + 3, 6))


@pytest.mark.timeout(60)
@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root for BPF")
async def test_a_flow_over_the_sockmap_cap_goes_to_the_next_tier_without_an_attempt() -> None:
    """At ``sockmap_max_flows`` a promoted flow goes to splice at once: counted as the
    tier's arm failure and a fallback, with the cap as its reason, and no arming tried
    (an ArmError through the tiers' frame would stay with the flow's life). Both flows
    relay byte-exact to the end."""
    tiers = configured(
        'tiers = ["sockmap", "splice"]\nsockmap_max_flows = 1\npromote_after = "10ms"\n'
        'status_dir = ""'
    )
    await start(tiers)
    assert tiers.plan == ("sockmap", "splice") and tiers.handover is not None
    then = tiers.handover.then
    acc = tiers.accelerator
    assert acc is not None
    flows = [make_flow(), make_flow()]
    with topology() as first, topology() as second, trio.fail_after(30):
        topos = [first, second]

        async def run(i: int) -> None:
            await then(flows[i], topos[i].gw_client, topos[i].gw_upstream, 10)
            topos[i].close_gateway()

        async def promote(i: int, tier: str) -> None:
            """Start flow i and exchange a little now and then: the bytes after its
            measuring window (it is not bulk) end the measurement, and it goes on in
            a kernel tier."""
            n.start_soon(run, i)
            for k in range(100):
                await trio.sleep(0.03)
                hello = payload(100, 1000 * i + k)
                await send_all(topos[i].client, hello)
                assert await recv_exact(topos[i].backend, 100) == hello
                if flows[i].tier == tier:
                    return
            raise AssertionError(f"flow {i} is in {flows[i].tier}, not {tier}")

        async with trio.open_nursery() as n:
            await promote(0, "sockmap")
            await promote(1, "splice")
            assert acc.status()["arm_failures"] == 1 and tiers.fallbacks == 1
            (fallback,) = [a for name, a in flows[1].events if name == "relay_fallback"]
            assert fallback == {
                "tier": "sockmap",
                "reason": "sockmap tier full (sockmap_max_flows = 1)",
            }
            for i, topo in enumerate(topos):
                up, down = payload(MiB + i, 10 + i), payload(MiB - i, 20 + i)
                at_backend, at_client = await exchange(topo, up, down)
                assert at_backend == up, first_mismatch(at_backend, up)
                assert at_client == down, first_mismatch(at_client, down)
    assert [f.tier for f in flows] == ["sockmap", "splice"]
