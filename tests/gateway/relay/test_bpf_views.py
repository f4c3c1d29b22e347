"""The Python side of the sockmap program's interface, against bpf/l4gw_sockmap.bpf.c.

The map values are read and written as packed structs: a field added to the C
struct and not here would shift every later counter silently.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from gateway.relay import libbpf, sockmap
from gateway.relay.sockmap import L4gwCtr

SOURCE = Path(__file__).resolve().parents[3] / "bpf" / "l4gw_sockmap.bpf.c"


def c_struct_fields(name: str) -> list[str]:
    """The field names of ``struct name`` in the BPF source, in order (all ``__u64``)."""
    body = re.search(rf"struct {name} \{{(.*?)\}};", SOURCE.read_text(), re.S)
    assert body is not None, f"struct {name} not in {SOURCE}"
    fields = re.findall(r"^\s*__u64\s+(\w+);", body.group(1), re.M)
    declared = re.findall(r"^\s*\w+\s+\w+;", body.group(1), re.M)
    assert len(fields) == len(declared), f"struct {name} has a field that is not a __u64"
    return fields


def test_counters_are_named_after_struct_l4gw_ctr() -> None:
    assert list(L4gwCtr._fields) == c_struct_fields("l4gw_ctr")
    assert sockmap._CTR.size == 8 * len(L4gwCtr._fields)
    raw = sockmap._CTR.pack(*range(1, 10))
    ctr = L4gwCtr._make(sockmap._CTR.unpack(raw))
    assert (ctr.bytes, ctr.held, ctr.trimmed, ctr.next_seq) == (1, 6, 8, 9)


def test_credit_matches_struct_l4gw_credit() -> None:
    assert c_struct_fields("l4gw_credit") == ["limit", "forwarded"]
    assert sockmap._CREDIT_VALUE.size == 16


def test_libbpf_messages_go_to_an_l4gw_logger(caplog: pytest.LogCaptureFixture) -> None:
    """libbpf's own lines (a verifier log, a failed open) are under ``l4gw.relay.libbpf``,
    with every other gateway logger, not under ``gateway.*``."""
    libbpf.install_logging()
    with (
        caplog.at_level(logging.DEBUG, logger="l4gw.relay.libbpf"),
        pytest.raises(libbpf.BpfError),
    ):
        libbpf.BpfObject("/nonexistent/l4gw-test.o")
    names = {r.name for r in caplog.records if "nonexistent" in r.getMessage()}
    assert names == {"l4gw.relay.libbpf"}
    assert sockmap.log.name == "l4gw.relay.sockmap"
