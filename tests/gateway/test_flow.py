"""gateway/flow.py: the addresses a flow holds, and its traceparent fields."""

from __future__ import annotations

import pytest

from gateway.flow import Flow, unmap


@pytest.mark.parametrize(
    ("addr", "want"),
    [
        (("127.0.0.1", 9), ("127.0.0.1", 9)),
        (("fd00::2", 5353, 0, 0), ("fd00::2", 5353)),  # flow info and scope id dropped
        (("fe80::1", 53, 0, 2), ("fe80::1", 53)),
        (("::ffff:198.18.0.2", 40000, 0, 0), ("198.18.0.2", 40000)),  # IPv4-mapped
        (("::ffff:1:2", 80, 0, 0), ("::ffff:1:2", 80)),  # not a mapped IPv4 address
    ],
)
def test_unmap(addr, want):
    assert unmap(addr) == want


def test_trace_parent_is_the_former_name_of_traceparent_in():
    flow = Flow(1, "l", "tcp", ("198.18.0.2", 40000), ("198.18.2.10", 443))
    assert flow.traceparent_in is None and flow.trace_parent is None
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    flow.trace_parent = tp  # a plugin written against the former name
    assert flow.traceparent_in == tp
    flow.traceparent_in = None
    assert flow.trace_parent is None
