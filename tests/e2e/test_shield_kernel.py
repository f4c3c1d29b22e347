"""The kernel shield attached by a real ``l4gw run`` in the namespace topology.

Clients are listed by writing the gateway's own trie (found through its fds), so
these tests need only the kernel half of the shield; the policy half (acl,
shield_after, ``l4gw shield``) has tests/e2e/test_shield_e2e.py.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from gateway.relay import libbpf
from gateway.shield.attach import TC_HANDLE, TC_PRIORITY
from gateway.shield.kernel import KernelShield
from gateway.shield.keys import ENTRY, key_of, parse_entry

from gwproc import GatewayProcess, l4gw
from netns import (
    CLIENT4,
    CLIENT6,
    GW_CLIENT_SIDE4,
    GW_CLIENT_SIDE6,
    Topology,
    inside,
    ip,
    tcp_socket_from,
)
from netns import topology as topology  # the fixture

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]

StartGateway = Callable[..., GatewayProcess]
PORT = 8443
SSH_LIKE = 2222
# A second client address per family, never listed.
OTHER4, OTHER6 = "198.18.0.3", "fd00::3"


def config(mode: str) -> str:
    return f"""
[[listener]]
name = "web4"
bind = "{GW_CLIENT_SIDE4}:{PORT}"

[[listener]]
name = "web6"
bind = "[{GW_CLIENT_SIDE6}]:{PORT}"

[[route]]
listener = "web4"
cluster = "nowhere"

[[route]]
listener = "web6"
cluster = "nowhere"

[cluster.nowhere]
endpoints = ["127.0.0.1:9"]

[shield]
interfaces = ["gw-cli"]
mode = "{mode}"
"""


def lpm_fd(gw: GatewayProcess) -> int:
    """An fd of the gateway's trie, found through its own fds (the caller closes it)."""
    assert gw.proc is not None
    fds = Path(f"/proc/{gw.proc.pid}/fdinfo")
    for info in fds.iterdir():
        text = info.read_text()
        # LPM_TRIE (11) with struct l4gw_shield_key / l4gw_shield_entry.
        if re.search(r"map_type:\s+11\n", text) and "key_size:\t20\n" in text:
            map_id = int(re.search(r"map_id:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
            return libbpf.map_fd_by_id(map_id)
    raise AssertionError(f"no shield map among the fds of {gw.proc.pid}")


def listed_drops(fd: int, network: str) -> int:
    raw = libbpf.map_lookup_elem(fd, key_of(ipaddress.ip_network(network)), ENTRY.size)
    assert raw is not None
    return parse_entry(raw)[1]


async def connects(topo: Topology, src: str, dst: str, port: int, timeout: float) -> bool:
    """Whether a handshake from ``src`` (in the client namespace) completes in time."""
    with await tcp_socket_from(topo.client, src) as sock:
        with trio.move_on_after(timeout):
            await sock.connect((dst, port))
            return True
    return False


def attached(topo: Topology) -> dict[str, object]:
    """What is attached to gw-cli, seen by ``ip link``, ``tc filter`` and the kernel."""
    link = topo.exec(topo.gateway, "ip", "-d", "link", "show", "dev", "gw-cli", check=True)
    filters = topo.exec(topo.gateway, "tc", "filter", "show", "dev", "gw-cli", "ingress")
    with inside(topo.gateway):
        ifindex = socket.if_nametoindex("gw-cli")
        tcx = [libbpf.prog_name(i) for i in libbpf.prog_query(ifindex, libbpf.BPF_TCX_INGRESS)]
        xdp = libbpf.xdp_query_id(ifindex, 0)
    return {
        "ip_link_xdp": "prog/xdp" in link.stdout,
        "tc_filters": filters.stdout.strip(),
        "tcx": tcx,
        "xdp": libbpf.prog_name(xdp) if xdp else None,
    }


NOTHING = {"ip_link_xdp": False, "tc_filters": "", "tcx": [], "xdp": None}


@pytest.mark.parametrize("mode", ["tc", "xdp"])
async def test_listed_clients_time_out_unlisted_connect(
    topology: Topology, gateway: StartGateway, mode: str
) -> None:
    topo = topology
    ip("-n", topo.client, "addr", "add", f"{OTHER4}/24", "dev", "cli0")
    ip("-n", topo.client, "-6", "addr", "add", f"{OTHER6}/64", "dev", "cli0", "nodad")
    gw = gateway(config(mode), netns=topo.gateway)
    how = "tcx link" if mode == "tc" else "xdp link (native)"
    assert f"shield: {mode} on gw-cli ({how})" in gw.log
    expected = {"tcx": ["l4gw_shield_tc"]} if mode == "tc" else {"xdp": "l4gw_shield_xdp"}
    state = attached(topo)
    assert {k: state[k] for k in expected} == expected

    fd = lpm_fd(gw)
    try:
        for network in (f"{CLIENT4}/32", f"{CLIENT6}/128"):
            net = ipaddress.ip_network(network)
            value = ENTRY.pack(0, 0, 96 + 32 if net.version == 4 else 128, 0)
            libbpf.map_update_elem(fd, key_of(net), value)
        for src, other, dst in (
            (CLIENT4, OTHER4, GW_CLIENT_SIDE4),
            (CLIENT6, OTHER6, GW_CLIENT_SIDE6),
        ):
            assert await connects(topo, other, dst, PORT, 3.0), f"{other} was not served"
            # Its SYN (and the retransmission 1 s later) is dropped: no answer, no refusal.
            assert not await connects(topo, src, dst, PORT, 1.5), f"{src} got through"
        assert listed_drops(fd, f"{CLIENT4}/32") >= 1
        assert listed_drops(fd, f"{CLIENT6}/128") >= 1
        # Another port of the host stays reachable for a listed client (refused, not dropped).
        with pytest.raises(ConnectionRefusedError):
            await connects(topo, CLIENT4, GW_CLIENT_SIDE4, SSH_LIKE, 3.0)
        # Unlisted again: served again.
        libbpf.map_delete_elem(fd, key_of(ipaddress.ip_network(f"{CLIENT4}/32")))
        assert await connects(topo, CLIENT4, GW_CLIENT_SIDE4, PORT, 3.0)
    finally:
        os.close(fd)
    assert gw.stop() == 0
    assert attached(topo) == NOTHING


async def test_kill9_leaves_nothing_and_the_next_start_recovers_netlink_leftovers(
    topology: Topology, gateway: StartGateway
) -> None:
    topo = topology
    # Two workers: the supervisor loaded and attached the shield before forking them.
    gw = gateway("[gateway]\nworkers = 2\n" + config("tc"), name="gw1", netns=topo.gateway)
    assert attached(topo)["tcx"] == ["l4gw_shield_tc"]
    assert gw.proc is not None
    gw.proc.kill()
    gw.wait()
    assert attached(topo) == NOTHING  # links go with the process that made them

    gw = gateway(config("xdp"), name="gw2", netns=topo.gateway)
    assert attached(topo)["xdp"] == "l4gw_shield_xdp"
    assert gw.proc is not None
    gw.proc.kill()
    gw.wait()
    assert attached(topo) == NOTHING

    # What only netlink attaches outlives its process (an older build, or a kernel
    # without tcx): a generic XDP program and our clsact filter, left behind.
    with inside(topo.gateway), KernelShield.load([], "tc", 16, [PORT], []) as leftover:
        ifindex = socket.if_nametoindex("gw-cli")
        libbpf.xdp_attach(ifindex, leftover.xdp_fd, libbpf.XDP_FLAGS_SKB_MODE)
        libbpf.tc_hook_create(ifindex)
        libbpf.tc_attach(ifindex, leftover.tc_fd, TC_HANDLE, TC_PRIORITY)
    state = attached(topo)
    assert state["xdp"] == "l4gw_shield_xdp" and "l4gw_shield_tc" in str(state["tc_filters"])

    gw = gateway(config("tc"), name="gw3", netns=topo.gateway)
    assert "removed what a previous gateway left: generic XDP program l4gw_shield_xdp" in gw.log
    assert "removed what a previous gateway left: tc ingress filter" in gw.log
    state = attached(topo)
    assert state["tcx"] == ["l4gw_shield_tc"] and state["xdp"] is None and not state["tc_filters"]
    assert gw.stop() == 0
    assert attached(topo) == NOTHING


async def test_cli_adds_lists_and_removes_through_the_admin_endpoint(
    topology: Topology, gateway: StartGateway
) -> None:
    topo = topology
    admin = '\n[admin]\nbind = "127.0.0.1:9901"\ntoken = "s3cret"\n'
    gw = gateway(config("auto") + admin, netns=topo.gateway)
    assert "shield: tc on gw-cli (tcx link)" in gw.log  # auto on veth: tc

    def shield(*args: str) -> tuple[int, str]:
        done = l4gw("shield", *args, "-c", str(gw.config_path), netns=topo.gateway)
        return done.returncode, done.stdout + done.stderr

    code, out = shield("add", CLIENT4, "--ttl", "1m", "--reason", "e2e test")
    assert code == 0 and f"added: {CLIENT4}/32" in out, out
    assert not await connects(topo, CLIENT4, GW_CLIENT_SIDE4, PORT, 1.5)
    code, out = shield("list")
    assert code == 0 and "kernel shield: on (tc)" in out, out
    line = next(line for line in out.splitlines() if line.startswith(f"{CLIENT4}/32"))
    assert re.search(r"expires +[\d.]+s +drops +[1-9]\d*  admin: e2e test", line), line
    code, out = shield("add", "127.0.0.1")
    assert code == 1 and "the gateway refused (409)" in out, out
    code, out = shield("del", f"{CLIENT4}/32")
    assert code == 0 and f"removed: {CLIENT4}/32" in out, out
    assert await connects(topo, CLIENT4, GW_CLIENT_SIDE4, PORT, 3.0)

    code, out = shield("status")
    assert code == 0, out
    assert "kernel shield: loads here (self-test passed)" in out
    assert "gw-cli: tc (tcx link); attached now: tcx l4gw_shield_tc" in out
    assert gw.stop() == 0


def link_fds(pid: int | str = "self") -> int:
    """How many bpf_link fds process ``pid`` holds."""
    count = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            count += "link_id:" in info.read_text()
        except OSError:
            pass
    return count


def test_a_forked_worker_holds_no_link(topology: Topology) -> None:
    """The attachment lives as long as the loading process, not as long as its workers."""
    with inside(topology.gateway):
        shield = KernelShield.load(["gw-cli"], "tc", 16, [PORT], [])
    with shield:
        assert link_fds() == 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if link_fds() == 0 and not shield.attachments else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert attached(topology)["tcx"] == ["l4gw_shield_tc"]  # the child's exit detached nothing
    assert attached(topology) == NOTHING
    assert link_fds() == 0
