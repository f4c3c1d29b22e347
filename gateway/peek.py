"""Reading a protocol preamble with MSG_PEEK, leaving the bytes in the socket.

Peeking has a trap: after a MSG_PEEK the data is still queued, so the socket
stays readable and a naive "wait, peek again" loop spins. The parsers here
say how many bytes they need in total, and we set ``SO_RCVLOWAT`` to that
count, so the next readiness wake-up comes only when enough bytes (or EOF)
have arrived. A peer that stalls hits the timeout; one that sends more than
the cap is refused.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TypeVar

import trio
from trio.lowlevel import wait_readable

from gateway.linux import SO_RCVLOWAT

T = TypeVar("T")


class PeekFailed(Exception):
    """The preamble did not arrive complete: timeout, EOF, or over the cap."""


async def peek(
    sock: socket.socket, parse: Callable[[bytes], T | int], cap: int, timeout: float
) -> T:
    """Peek until ``parse`` returns a result that is not an int.

    ``parse(data)`` returns its result, or an int N > len(data): it needs at
    least N bytes in total. It may raise; the exception propagates.

    Raises:
        PeekFailed: timeout, the peer closed or reset first, or N > ``cap``.
    """
    lowat = 1
    seen = -1
    try:
        with trio.move_on_after(timeout):
            while True:
                await wait_readable(sock)
                try:
                    data = sock.recv(cap, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise PeekFailed(f"peer error while peeking: {exc.strerror}")
                result = parse(data)
                if not isinstance(result, int):
                    return result
                if result > cap:
                    raise PeekFailed(f"preamble needs {result} bytes, more than {cap}")
                if len(data) == seen or not data:
                    # Readable without new bytes: EOF (SO_RCVLOWAT is not
                    # honoured once the peer has closed).
                    raise PeekFailed("peer closed before the preamble was complete")
                seen = len(data)
                lowat = result
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVLOWAT, lowat)
        raise PeekFailed(f"preamble not complete within {timeout:g}s")
    finally:
        if lowat != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVLOWAT, 1)
            except OSError:
                pass


def recv_exactly_queued(sock: socket.socket, n: int) -> bytes:
    """Consume ``n`` bytes that a successful peek showed are already queued."""
    data = sock.recv(n)
    if len(data) != n:
        raise PeekFailed(f"expected {n} queued bytes, got {len(data)}")
    return data
