"""Fuzz target: the PROXY protocol v1/v2 parser (gateway/proxy_protocol.py).

The parser reads bytes from clients it does not trust. Besides "raises nothing but
ProxyProtocolError" (its rule 2), :func:`check` holds it to the rest of its contract:

* a "need more" answer N is more than it has and at most a whole v2 header (rule 4),
  and every strict prefix of a header it accepts asks for more, never for more bytes
  than that header has (so a peer that sent a whole header never waits forever);
* the header it returns depends only on its own ``length`` bytes (rule 3), whatever
  the buffer type;
* what it returns can be encoded again and parses to the same header (rule 5: one
  reading), and its accessors work.
"""

from __future__ import annotations

from fuzzing import instrumented, main

with instrumented(__name__, include=["gateway"]):
    from gateway import proxy_protocol as pp

MAX_HEADER = 16 + pp.MAX_V2_LENGTH


def check(data: bytes) -> None:
    try:
        result = pp.parse(data)
    except pp.ProxyProtocolError as exc:
        assert str(exc), "an error without a reason"
        return
    assert pp.parse(bytearray(data)) == result
    assert pp.parse(memoryview(data)) == result
    if isinstance(result, int):
        assert type(result) is int
        assert len(data) < result <= MAX_HEADER, (len(data), result)
        return
    assert 0 < result.length <= len(data) <= len(data)
    header = data[: result.length]
    assert pp.parse(header) == result
    assert pp.parse(header + b"\r\n\x00junk") == result
    step = max(1, result.length // 64)
    for cut in (*range(0, result.length, step), result.length - 1):
        need = pp.parse(header[:cut])
        assert isinstance(need, int) and cut < need <= result.length, (cut, need, result)
    _ = result.authority, result.traceparent  # parse lets through only what they decode
    _round_trip(result)


def _round_trip(result: pp.ProxyHeader) -> None:
    if result.source is None or result.destination is None:
        return
    if result.version == 1:
        again = pp.parse(pp.encode_v1(result.source, result.destination))
        assert not isinstance(again, int)
        assert (again.source, again.destination) == (result.source, result.destination)
        return
    assert result.transport is not None
    # The encoder fills in a checksum itself: ask for one where the header had one.
    tlvs = [(kind, b"" if kind == pp.PP2_TYPE_CRC32C else value) for kind, value in result.tlvs]
    encoded = pp.encode_v2(result.source, result.destination, transport=result.transport,
                           tlvs=tlvs)  # fmt: skip
    again = pp.parse(encoded)
    assert not isinstance(again, int)
    assert (again.source, again.destination, again.transport) == (
        result.source,
        result.destination,
        result.transport,
    )
    assert [k for k, _ in again.tlvs] == [k for k, _ in result.tlvs]
    assert [v for k, v in again.tlvs if k != pp.PP2_TYPE_CRC32C] == [
        v for k, v in result.tlvs if k != pp.PP2_TYPE_CRC32C
    ]


if __name__ == "__main__":
    main(check)
