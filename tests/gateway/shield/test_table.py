"""The shield's policy on plain values: never-list, TTLs, cap, expiry, the shared journal.

The kernel side is a recording stand-in here (``FakeKernel``: the map's
contract, nothing more); tests/e2e/test_shield_e2e.py runs the real program.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Iterator
from ipaddress import IPv4Network, IPv6Network, ip_network

import pytest

from gateway.shield.journal import Journal
from gateway.shield.never import NeverList, normalize
from gateway.shield.table import Shield, ShieldRefused

Network = IPv4Network | IPv6Network
S = 1_000_000_000


class FakeKernel:
    """The map operations of gateway.shield.kernel.KernelShield, recorded."""

    mode = "tc"

    def __init__(self) -> None:
        self.map: dict[Network, int] = {}
        self.drop_counts: dict[Network, int] = {}

    def put(self, net: Network, deadline_ns: int) -> None:
        self.map[net] = deadline_ns

    def delete(self, net: Network) -> None:
        self.map.pop(net, None)

    def drops(self, net: Network) -> int:
        return self.drop_counts.get(net, 0)

    def counters(self) -> tuple[int, int]:
        return (10, sum(self.drop_counts.values()))

    def set_ports(self, tcp_ports: Collection[int], udp_ports: Collection[int]) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000 * S

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def table(clock: Clock, kernel: FakeKernel) -> Iterator[Shield]:
    never = NeverList.build(
        configured=[ip_network("10.99.0.0/16")],
        trusted=[("public", ip_network("198.18.200.7/32"))],
        local=[("eth0", ip_network("198.18.0.2/32")), ("eth0", ip_network("fd00:1::2/128"))],
    )
    shield = Shield(kernel, max_entries=3, never=never, clock_ns=clock)
    yield shield
    shield.close()


# --- the never-list -----------------------------------------------------------------


@pytest.mark.parametrize(
    "cidr,what",
    [
        ("127.0.0.5", "127.0.0.0/8 (loopback)"),
        ("::1", "::1/128 (loopback)"),
        ("::ffff:127.0.0.1", "127.0.0.0/8 (loopback)"),
        ("198.18.0.2", "198.18.0.2/32 (the gateway's own address on eth0)"),
        ("fd00:1::2", "fd00:1::2/128 (the gateway's own address on eth0)"),
        ("198.18.0.0/15", "contains 198.18.0.2/32 (the gateway's own address"),
        ("fd00::/8", "contains fd00:1::2/128"),
        ("0.0.0.0/0", "contains 127.0.0.0/8 (loopback)"),
        ("198.18.200.7", "proxy_protocol_trusted of listener public"),
        ("198.18.200.0/24", "contains 198.18.200.7/32 (proxy_protocol_trusted"),
        ("10.99.3.4", "is inside 10.99.0.0/16 ([shield] never)"),
    ],
)
def test_never_list_refuses_with_what_it_would_block(
    table: Shield, kernel: FakeKernel, cidr: str, what: str
) -> None:
    with pytest.raises(ShieldRefused) as caught:
        table.add(cidr, 60, "test", source="admin", static=True)
    assert what in caught.value.reason
    assert caught.value.reason.startswith("never shielded: ")
    assert kernel.map == {} and table.entries() == []


def test_never_list_from_a_config_takes_proxy_protocol_trusted() -> None:
    from gateway.config import from_dict
    from gateway.shield.never import from_config

    config = from_dict(
        {
            "listener": [
                {
                    "name": "lb",
                    "bind": "127.0.0.1:1",
                    "proxy_protocol": True,
                    "proxy_protocol_trusted": ["198.18.9.0/24"],
                }
            ],
            "route": [{"name": "r", "listener": "lb", "cluster": "c"}],
            "cluster": {"c": {"endpoints": ["127.0.0.1:2"]}},
        },
        "t",
        {},
    )
    never = from_config(config, [])
    refusal = never.refusal(normalize("198.18.9.77"))
    assert refusal is not None and "proxy_protocol_trusted of listener lb" in refusal
    assert never.refusal(normalize("198.18.10.1")) is None


def test_ipv6_prefix_over_the_mapped_range_is_refused(table: Shield) -> None:
    with pytest.raises(ShieldRefused, match="IPv4-mapped"):
        table.add("::fffe:0:0/95", 60, "test", source="admin", static=True)


def test_mapped_address_is_stored_as_ipv4(table: Shield, kernel: FakeKernel) -> None:
    entry = table.add("::ffff:198.18.5.1", 60, "t", source="ratelimit")
    assert entry.network == ip_network("198.18.5.1/32")
    assert table.lookup("198.18.5.1") is not None
    assert table.lookup("::ffff:198.18.5.1") is not None


# --- TTLs ------------------------------------------------------------------------------


def test_automatic_entries_need_a_ttl(table: Shield) -> None:
    with pytest.raises(ShieldRefused, match="needs a TTL"):
        table.add("198.18.5.1", None, "flood", source="myplugin")
    with pytest.raises(ShieldRefused, match="above 0s"):
        table.add("198.18.5.1", 0, "flood", source="myplugin")
    static = table.add("198.18.5.1", None, "listed", source="acl", static=True)
    assert static.deadline_ns == 0 and static.expires_in(0) is None


def test_add_lookup_remove(table: Shield, kernel: FakeKernel, clock: Clock) -> None:
    entry = table.add("198.18.5.0/24", 30, "flood", source="ratelimit")
    assert kernel.map == {ip_network("198.18.5.0/24"): clock.now + 30 * S}
    assert entry.expires_in(clock.now) == 30
    host = table.add("198.18.5.9", 10, "worse", source="ratelimit")
    found = table.lookup("198.18.5.9")
    assert found is not None and found.network == host.network  # longest prefix
    found = table.lookup("198.18.5.10")
    assert found is not None and found.network == ip_network("198.18.5.0/24")
    assert table.lookup("198.18.6.1") is None
    kernel.drop_counts[host.network] = 7
    removed = table.remove("198.18.5.9")
    assert removed is not None and removed.drops == 7
    assert table.remove("198.18.5.9") is None
    assert ip_network("198.18.5.9/32") not in kernel.map
    assert table.changes["add"] == 2 and table.changes["remove"] == 1
    assert table.drops_by_source() == {"ratelimit": 7}


def test_renew_keeps_the_later_deadline_and_static_entries(
    table: Shield, kernel: FakeKernel, clock: Clock
) -> None:
    table.add("198.18.5.1", 60, "a", source="ratelimit")
    table.add("198.18.5.1", 10, "b", source="ratelimit")  # shorter: no change
    assert kernel.map[ip_network("198.18.5.1/32")] == clock.now + 60 * S
    assert table.changes["add"] == 1
    table.add("198.18.5.2", None, "acl deny", source="acl", static=True)
    table.add("198.18.5.2", None, "acl deny", source="acl", static=True)  # identical: no-op
    table.add("198.18.5.2", 60, "flood", source="ratelimit")  # never shortens a static one
    assert kernel.map[ip_network("198.18.5.2/32")] == 0
    assert table.changes["add"] == 2


def test_expiry_sweep(
    table: Shield, kernel: FakeKernel, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    table.add("198.18.5.1", 5, "a", source="ratelimit")
    table.add("198.18.5.2", 50, "b", source="ratelimit")
    table.add("198.18.5.3", None, "c", source="acl", static=True)
    assert table.sweep() == []
    clock.now += 6 * S
    assert table.lookup("198.18.5.1") is None  # expired before it is swept
    assert [str(e.network) for e in table.entries()] == ["198.18.5.3/32", "198.18.5.2/32"]
    with caplog.at_level(logging.INFO, "l4gw.shield"):
        gone = table.sweep()
    assert [str(e.network) for e in gone] == ["198.18.5.1/32"]
    assert ip_network("198.18.5.1/32") not in kernel.map
    assert table.changes["expire"] == 1
    assert sum("expired 198.18.5.1/32" in r.getMessage() for r in caplog.records) == 1
    assert table.sweep() == []


def test_cap_evicts_the_soonest_expiring(
    table: Shield, kernel: FakeKernel, caplog: pytest.LogCaptureFixture
) -> None:
    table.add("198.18.5.1", 50, "a", source="ratelimit")
    table.add("198.18.5.2", 5, "b", source="ratelimit")
    table.add("198.18.5.3", None, "c", source="acl", static=True)
    with caplog.at_level(logging.WARNING, "l4gw.shield"):
        table.add("198.18.5.4", 100, "d", source="ratelimit")
    listed = {str(e.network) for e in table.entries()}
    assert listed == {"198.18.5.1/32", "198.18.5.3/32", "198.18.5.4/32"}
    assert ip_network("198.18.5.2/32") not in kernel.map
    assert table.changes["evict"] == 1
    assert any("evicted 198.18.5.2/32" in r.getMessage() for r in caplog.records)


def test_a_table_full_of_static_entries_refuses(table: Shield) -> None:
    for i in range(3):
        table.add(f"198.18.5.{i}", None, "deny", source="acl", static=True)
    with pytest.raises(ShieldRefused, match="full: 3 entries without expiry"):
        table.add("198.18.5.9", 60, "flood", source="ratelimit")


def test_without_kernel_the_table_still_works(clock: Clock) -> None:
    shield = Shield(None, off_reason="BPF: operation not permitted", clock_ns=clock)
    shield.add("198.18.5.1", 60, "flood", source="ratelimit")
    assert shield.lookup("198.18.5.1") is not None
    status = shield.status()
    assert status["kernel"] == {
        "enabled": False,
        "why_off": "BPF: operation not permitted",
        "enforced_by": "l4gw_admit (acl, ratelimit plugins)",
    }
    assert status["entries"] == 1
    shield.close()


# --- shared by forked workers ----------------------------------------------------------


def in_worker(action: Callable[[], object]) -> int:
    """Run ``action`` in a forked child (a worker) to its end; the child's pid.

    Raises AssertionError when the action failed in the child."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


def test_workers_share_the_table_through_the_journal(clock: Clock) -> None:
    """A child process (a worker) adds; the parent sees the entry, its reason and source."""
    shield = Shield(None, clock_ns=clock)
    shield.add("198.18.7.1", 60, "before the fork", source="admin")

    def worker() -> None:
        assert shield.lookup("198.18.7.1") is not None
        shield.add("198.18.7.2", 60, "from a worker", source="ratelimit")
        shield.remove("198.18.7.1")

    pid = in_worker(worker)
    entry = shield.lookup("198.18.7.2")
    assert entry is not None and (entry.reason, entry.source, entry.by) == (
        "from a worker",
        "ratelimit",
        pid,
    )
    assert shield.lookup("198.18.7.1") is None
    assert shield.changes["add"] == 2 and shield.changes["remove"] == 1
    shield.close()


def test_an_empty_table_sees_what_a_worker_adds(clock: Clock) -> None:
    """The lookup of an empty table takes no lock; the shared counter still tells it
    that a worker added an entry, before the next connection's lookup."""
    shield = Shield(None, clock_ns=clock)
    assert shield.lookup("198.18.7.3") is None
    in_worker(lambda: shield.add("198.18.7.3", 60, "from a worker", source="ratelimit"))
    entry = shield.lookup("198.18.7.3")
    assert entry is not None and entry.reason == "from a worker"
    shield.close()


def test_compaction_keeps_entries_and_counts(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.shield.table.COMPACT_AT", 4096)
    journal = Journal()
    shield = Shield(None, journal=journal, clock_ns=clock, max_entries=10_000)
    other = Shield(None, journal=journal.clone(), clock_ns=clock)
    for round_ in range(40):
        shield.add("198.18.8.1", 60 + round_, f"round {round_}", source="ratelimit")
        shield.remove("198.18.8.1")
    shield.add("198.18.8.2", 60, "kept", source="ratelimit")
    assert journal.size() < 4096 + 512  # compacted at least once
    other.refresh()
    assert other.changes["add"] == 41 and other.changes["remove"] == 40
    entry = other.lookup("198.18.8.2")
    assert entry is not None and entry.reason == "kept"
    shield.close()
    other.close()


def test_journal_lock_excludes_another_process() -> None:
    journal = Journal()
    read, write = os.pipe()
    with journal.locked():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            with journal.locked():
                os.write(write, b"x")
            os._exit(0)
        time.sleep(0.3)  # long enough for the child to write, were it not excluded
        os.set_blocking(read, False)
        with pytest.raises(BlockingIOError):
            os.read(read, 1)
    os.set_blocking(read, True)
    assert os.read(read, 1) == b"x"
    os.waitpid(pid, 0)
    os.close(read)
    os.close(write)
    journal.close()


def test_a_lower_cap_on_reload_evicts_down_to_it(table: Shield, clock: Clock) -> None:
    table.max_entries = 10
    for i in range(6):
        table.add(f"198.18.6.{i}", 100 - i, "flood", source="ratelimit")
    table.max_entries = 3
    table.add("198.18.6.9", 50, "flood", source="ratelimit")
    # Down to 2 before the new one is listed: the four expiring soonest (.5 to .2) go.
    assert {str(e.network) for e in table.entries()} == {
        "198.18.6.0/32",
        "198.18.6.1/32",
        "198.18.6.9/32",
    }
    assert table.changes["evict"] == 4


def test_a_full_table_evicts_in_deadline_order(clock: Clock) -> None:
    """2000 adds into a table of 1000 (the heap of deadlines, its stale items skipped)."""
    shield = Shield(None, max_entries=1000, clock_ns=clock)
    for i in range(2000):
        shield.add(f"10.{i // 256}.{i % 256}.1", 60 + i, "flood", source="ratelimit")
    assert len(shield) == 1000 and shield.changes["evict"] == 1000
    assert shield.lookup("10.0.0.1") is None  # the soonest expiring went first
    assert shield.lookup("10.7.207.1") is not None
    shield.close()


def test_eviction_follows_a_renewal(table: Shield) -> None:
    table.max_entries = 2
    table.add("198.18.6.1", 10, "a", source="ratelimit")
    table.add("198.18.6.2", 20, "b", source="ratelimit")
    table.add("198.18.6.1", 30, "a again", source="ratelimit")  # now expires last
    table.add("198.18.6.3", 40, "c", source="ratelimit")
    assert {str(e.network) for e in table.entries()} == {"198.18.6.1/32", "198.18.6.3/32"}
