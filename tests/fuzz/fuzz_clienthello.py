"""Fuzz target: the TLS ClientHello parser (gateway/clienthello.py).

The listener peeks at bytes from anyone and hands them to ``parse_client_hello``.
:func:`check` holds it to its rules: it never raises (rule 1); a "need more" answer N
is more than it has and at most ``cap`` (rule 4); ``cap`` is exact (the same bytes
with ``cap = len(data)`` give the same hello, or None where more was needed); "not a
hello" stays so however many bytes follow; a hello ignores the bytes after it; and
what it returns is a valid host name and ALPN list.
"""

from __future__ import annotations

import re

from fuzzing import instrumented, main

with instrumented(__name__, include=["gateway"]):
    from gateway.clienthello import MAX_CLIENT_HELLO, ClientHello, parse_client_hello

HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")


def check(data: bytes) -> None:
    result = parse_client_hello(data)
    assert parse_client_hello(bytearray(data)) == result
    assert parse_client_hello(memoryview(data)) == result
    exact = parse_client_hello(data, cap=len(data))
    if isinstance(result, ClientHello):
        assert result.sni is None or (len(result.sni) <= 253 and HOST_NAME.fullmatch(result.sni))
        assert isinstance(result.alpn, tuple)
        assert all(isinstance(p, str) and p for p in result.alpn)
        assert parse_client_hello(data + b"\x16\x03\x01\x00\x05junk!") == result
        assert exact == result
    elif result is None:
        assert parse_client_hello(data + b"\x00" * 7) is None
        assert exact is None
    else:
        assert type(result) is int
        assert len(data) < result <= MAX_CLIENT_HELLO, (len(data), result)
        assert exact is None
        if data:
            # A prefix of a valid beginning is a valid beginning.
            assert isinstance(parse_client_hello(data[: len(data) // 2]), int)


if __name__ == "__main__":
    main(check)
