"""gateway.relay.policy: the relay tiers' decisions on plain values: config, plan,
per-flow tiers, fallback."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.relay.policy import (
    DEFAULT_TIERS,
    KERNEL_TIERS,
    SCHEMA,
    TIERS,
    Policy,
    fallback,
    plan,
    tiers_for,
)
from gateway.schema import Invalid, check_section


def section(**raw: object) -> dict[str, object]:
    problems: list[str] = []
    out = check_section(raw, "plugin.relay", SCHEMA, problems)
    if problems or out is None:
        raise Invalid("; ".join(problems))
    return out


def test_defaults() -> None:
    p = Policy.from_section(section())
    assert p.tiers == DEFAULT_TIERS and p.tiers[-1] == "copy"
    assert (p.after_bytes, p.after_seconds, p.sockmap_for_bulk) == (256 * 1024, 0.1, False)
    assert p.bulk_rate == 16 << 20
    assert not p.immediate


def test_bulk_is_a_rate_not_a_byte_count() -> None:
    p = Policy.from_section(section())
    # iperf through copy: 256 KiB in a fraction of a millisecond.
    assert p.is_bulk(256 << 10, 0.0002)
    # A 64-byte ping-pong reaches 256 KiB too, at about 2 MB/s: request/response.
    assert not p.is_bulk(256 << 10, 0.13)
    # A keepalive connection promoted by age after 100 ms (or 1 s) of small requests.
    assert not p.is_bulk(15_000, 0.1)
    assert not p.is_bulk(150_000, 1.0)
    assert p.is_bulk(32 << 20, 1.0)


def test_copy_is_appended_and_must_be_last() -> None:
    assert section(tiers=["sockmap"])["tiers"] == ("sockmap", "copy")
    assert section(tiers=["copy"])["tiers"] == ("copy",)
    with pytest.raises(Invalid, match="last"):
        section(tiers=["copy", "splice"])
    with pytest.raises(Invalid, match="twice"):
        section(tiers=["splice", "splice"])
    with pytest.raises(Invalid, match="tiers"):
        section(tiers=["ebpf"])
    with pytest.raises(Invalid, match="tiers"):
        section(tiers=[])


@pytest.mark.parametrize(
    ("raw", "immediate"),
    [({}, False), ({"promote_after_bytes": 0}, True), ({"promote_after": 0}, True),
     ({"promote_after_bytes": "1MiB", "promote_after": "10s"}, False)],
)  # fmt: skip
def test_zero_threshold_promotes_at_once(raw: dict[str, object], immediate: bool) -> None:
    assert Policy.from_section(section(**raw)).immediate is immediate


def test_plan_keeps_order_and_only_enabled_kernel_tiers() -> None:
    tiers = ("sockmap", "splice", "copy")
    assert plan(tiers, frozenset({"sockmap", "splice"})) == ("sockmap", "splice")
    assert plan(tiers, frozenset({"splice"})) == ("splice",)
    assert plan(("splice", "sockmap", "copy"), frozenset(KERNEL_TIERS)) == ("splice", "sockmap")
    # Nothing enabled: the plugin stays out of the way (l4gw_relay returns None).
    assert plan(tiers, frozenset()) == ()
    assert plan(("copy",), frozenset(KERNEL_TIERS)) == ()


def test_bulk_flows_skip_sockmap_only_when_splice_can_take_them() -> None:
    both = ("sockmap", "splice")
    assert tiers_for(both, bulk=True, sockmap_for_bulk=False) == ("splice",)
    assert tiers_for(both, bulk=False, sockmap_for_bulk=False) == both
    assert tiers_for(both, bulk=True, sockmap_for_bulk=True) == both
    # No splice to take it: sockmap is still better than the copy tier's fallback.
    assert tiers_for(("sockmap",), bulk=True, sockmap_for_bulk=False) == ("sockmap",)


def test_fallback_names_the_next_usable_tier() -> None:
    tiers = ("sockmap", "splice", "copy")
    assert fallback(tiers, frozenset({"splice"}), "sockmap") == "splice"
    assert fallback(tiers, frozenset(), "sockmap") == "copy"
    assert fallback(tiers, frozenset(), "splice") == "copy"
    assert fallback(("splice", "sockmap", "copy"), frozenset({"sockmap"}), "splice") == "sockmap"


@given(
    st.lists(st.sampled_from(TIERS), unique=True, min_size=1),
    st.sets(st.sampled_from(KERNEL_TIERS)),
    st.booleans(),
    st.booleans(),
)
def test_a_flow_only_ever_tries_enabled_tiers_in_configured_order(
    raw: list[str], enabled: set[str], bulk: bool, for_bulk: bool
) -> None:
    try:
        tiers = section(tiers=raw)["tiers"]
    except Invalid:
        assert "copy" in raw[:-1]
        return
    assert isinstance(tiers, tuple)
    chosen = tiers_for(plan(tiers, frozenset(enabled)), bulk, for_bulk)
    assert set(chosen) <= enabled
    assert list(chosen) == [t for t in tiers if t in chosen]
    if chosen == ():
        assert not (set(tiers) & enabled)
