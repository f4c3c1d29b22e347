"""bench/conn_cost.py still runs: CPU per connection and idle memory, tiny counts.

Not a performance test (no number is compared with a threshold): it keeps the
script, the reference proxies (uvloop, trio) and the 9,900-connection harness from rotting.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchrun import run_quick

TOOLS = ("nginx", "haproxy")


@pytest.mark.timeout(90)
def test_cpu_per_connection_every_path(tmp_path: Path) -> None:
    _, report = run_quick("conn_cost.py", ["cpu"], TOOLS, tmp_path, 80)
    result = report["result"]
    assert set(result) == {"gateway", "gateway-copy", "haproxy", "uvloop"}
    for name, cell in result.items():
        assert cell["median"] > 0, name
        assert cell["median"] == pytest.approx(cell["user"] + cell["kernel"], abs=1e-6), name


@pytest.mark.timeout(90)
def test_reference_proxies_and_a_variant(tmp_path: Path) -> None:
    """bench/trio_proxy.py (both kinds) and a ``--variant`` of the gateway serve the load;
    the variant, named in ``--paths`` too, runs once a round (not once per mention)."""
    _, report = run_quick(
        "conn_cost.py",
        [
            "cpu",
            "--paths",
            "trio-lean,trio-naive,gw-core",
            "--variant",
            'core=disable_plugins = ["relay"]',
        ],
        TOOLS,
        tmp_path,
        80,
    )
    assert set(report["result"]) == {"trio-lean", "trio-naive", "gw-core"}
    for name, cell in report["result"].items():
        assert cell["median"] > 0, name
        assert len(cell["samples"]) == 1, name  # --quick: one round


@pytest.mark.timeout(90)
def test_a_tree_copy_and_another_interpreter(tmp_path: Path) -> None:
    """``--gateway-src LABEL=DIR`` runs a copy of a tree, ``LABEL=PYTHON`` this tree by
    that interpreter (here the test's own: the path must start and serve); a spec that is
    neither is refused with its name."""
    tree = tmp_path / "tree"
    tree.mkdir()
    root = Path(__file__).resolve().parents[2]
    (tree / "gateway").symlink_to(root / "gateway")
    (tree / "l4gw_plugins").symlink_to(root / "plugins")
    _, report = run_quick(
        "conn_cost.py",
        ["cpu", "--paths", "gw-copy", "--gateway-src", f"copy={tree}",
         "--gateway-src", f"py={sys.executable}"],
        TOOLS,
        tmp_path,
        80,
    )  # fmt: skip
    assert set(report["result"]) == {"gw-copy", "gw-py"}
    for name, cell in report["result"].items():
        assert cell["median"] > 0, name
    with pytest.raises(AssertionError, match=r"want LABEL=DIR .* or LABEL=PYTHON"):
        run_quick("conn_cost.py", ["cpu", "--gateway-src", f"x={tmp_path}"], TOOLS, tmp_path, 30)


@pytest.mark.timeout(60)
def test_idle_connections_all_served(tmp_path: Path) -> None:
    _, report = run_quick(
        "conn_cost.py", ["idle", "--paths", "gateway-copy,uvloop"], TOOLS, tmp_path, 50
    )
    for name, cell in report["result"].items():
        assert cell["failed"] == 0, name
        assert cell["rss_held_kib"] >= cell["rss_before_kib"] > 0, name
        assert cell["held_cpu_pct"] >= 0, name


@pytest.mark.timeout(60)
def test_idle_connections_promoted_to_the_kernel_tier_all_served(tmp_path: Path) -> None:
    """Handed to sockmap (the default) or splice, a held flow keeps its two sockets'
    descriptors and no other (no epoll set of its own, no pipe while idle)."""
    splice_only = 'spl=\\n[plugin.relay]\\ntiers = ["splice", "copy"]'
    _, report = run_quick(
        "conn_cost.py",
        ["idle", "--paths", "gateway", "--promote", "0.3", "--variant", splice_only],
        TOOLS,
        tmp_path,
        50,
    )
    for name in ("gateway", "gw-spl"):
        cell = report["result"][name]
        assert cell["failed"] == 0, name
        assert cell["kernel_tier_flows"] > 0, (name, cell)
        assert cell["held_cpu_pct"] >= 0, name
        assert 1.9 < cell["fds_per_conn"] < 2.2, (name, cell)


@pytest.mark.timeout(300)
def test_instructions_per_connection_under_callgrind(tmp_path: Path) -> None:
    """The deterministic count: every path served its connections under valgrind, and
    one measurement of the same process is near the next (what makes it worth having)."""
    _, report = run_quick(
        "conn_cost.py",
        ["instructions", "--paths", "trio-lean,gateway-copy", "--rounds", "2"],
        (*TOOLS, "valgrind", "callgrind_control"),
        tmp_path,
        280,
    )
    result = report["result"]
    assert set(result) == {"trio-lean", "gateway-copy"}
    for name, cell in result.items():
        first, second = cell["samples"]
        assert first > 10_000 and second > 10_000, name
        assert abs(first - second) < 0.2 * max(first, second), (name, cell)
