"""The sockmap tier's canary: one flow over loopback that must come out whole.

The sockmap tier is enabled only after this self-test passed on the host, with
the gateway's privileges (reference/sockmap.md §8 R15): a kernel may load the
verdict program and still redirect wrongly (a stall of bytes queued before
arming, a backlog that is not held back, a FIN lost). The canary checks the
behaviour that the tier's rules rely on, on plain loopback sockets, before any
real flow is given to it.

Rules kept here:

* **Off the connection path.** :func:`self_test` runs its own trio loop in a
  thread, bounded by its timeout; the gateway calls it from a start-up worker
  thread and ``l4gw accel status`` from the command line.
* **The canary is not traffic.** Its flow's counts are dropped from the
  accelerator's status afterwards; only the outcome is kept
  (:meth:`Accelerator.note_self_test`).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Final

import trio

from gateway.relay.sockmap import Accelerator, FlowReport, Limits
from gateway.relay.stats import RelayStats

__all__ = ["self_test"]

log = logging.getLogger("l4gw.relay.sockmap")


def self_test(acc: Accelerator, timeout: float = 20.0) -> str | None:
    """Run the canary flows (sockmap.md §9 T24) over loopback through ``acc``.

    Covers pre-insertion bytes both ways (T1/T2), a sequence-numbered upload to a
    slow small-buffer reader with a small watermark, so the program holds bytes
    and the backlog must stay under it (T13/T23 small), a half-close with the
    reply sent after EOF (T7) and SO_ERROR after a pure FIN (T10), with zero
    anomaly counters and empty maps afterwards. Runs its own trio loop in a
    thread, so it may be called from synchronous start-up code or from inside trio.

    Args:
        acc: The loaded accelerator.
        timeout: Upper bound for the whole canary.

    Returns:
        ``None`` when every check passed, else a one-line reason. Also kept in
        ``acc`` for :meth:`Accelerator.status`.
    """
    result: list[str | None] = ["self-test did not finish"]

    async def canary() -> str | None:
        with trio.move_on_after(timeout):
            return await _canary_flow(acc)
        return f"canary timed out after {timeout}s"

    def runner() -> None:
        try:
            result[0] = trio.run(canary)
        except Exception as exc:
            result[0] = f"self-test error: {type(exc).__name__}: {exc}"

    th = threading.Thread(target=runner, name="l4gw-sockmap-selftest")
    th.start()
    th.join(timeout + 5)
    acc.note_self_test(result[0])
    if result[0] is not None:
        # The caller says it once, with what it does instead.
        log.debug("sockmap: self-test failed: %s", result[0])
    return result[0]


def _seq(n: int, seed: int) -> bytes:
    return b"".join(struct.pack("=Q", (seed << 40) + i) for i in range((n + 7) // 8))[:n]


def _loopback_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    lsn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            lsn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        con = socket.create_connection(lsn.getsockname())
        acc, _ = lsn.accept()
        return con, acc
    finally:
        lsn.close()


# A small watermark, so the canary's slow reader makes the program hold bytes.
_CANARY_LIMITS: Final = Limits(high_watermark=64 << 10, hard_cap=64 << 20)
# What may be in flight above the watermark: the skb that crossed it (a loopback GSO
# skb is at most 64 KiB; generous, since BIG TCP raises that).
_SKB_MARGIN: Final = 512 << 10


async def _canary_flow(acc: Accelerator) -> str | None:
    client_s, gw_a = _loopback_pair()
    gw_b, backend_s = _loopback_pair(rcvbuf=64 << 10)
    for s in (gw_a, gw_b):
        s.setblocking(False)
    client = trio.socket.from_stdlib_socket(client_s)
    backend = trio.socket.from_stdlib_socket(backend_s)
    pre_up, banner = _seq(3004, 1), _seq(777, 2)
    bulk, reply = _seq(2 << 20, 3), _seq(256 << 10, 4)
    outcome: list[str] = []
    report = FlowReport()
    try:
        await client.send(pre_up)
        await backend.send(banner)
        await trio.sleep(0.02)
        stats = RelayStats()

        async def run() -> None:
            outcome.append(
                await acc.relay(
                    gw_a, gw_b, stats, idle_timeout=None, limits=_CANARY_LIMITS, report=report
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            with trio.move_on_after(0.5) as cs:
                got_pre = await _recv_exact(backend, len(pre_up))
                got_banner = await _recv_exact(client, len(banner))
            if cs.cancelled_caught:
                nursery.cancel_scope.cancel()
                return "T1/T2: pre-insertion bytes not delivered within 0.5 s (kick)"
            if got_pre != pre_up or got_banner != banner:
                nursery.cancel_scope.cancel()
                return "T1/T2: pre-insertion bytes corrupted"

            async def upload() -> None:
                view = memoryview(bulk)
                while view:
                    view = view[await client.send(view[: 256 << 10]) :]
                client.shutdown(socket.SHUT_WR)

            nursery.start_soon(upload)
            got = bytearray()
            while chunk := await backend.recv(32 << 10):
                got += chunk
                await trio.sleep(0.001)  # slow reader
            if bytes(got) != bulk:
                nursery.cancel_scope.cancel()
                return f"T7/T13/T23: upload corrupted ({len(got)} of {len(bulk)} bytes)"
            if backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                nursery.cancel_scope.cancel()
                return "T10: SO_ERROR set on the backend after FIN"
            view = memoryview(reply)
            while view:
                view = view[await backend.send(view) :]
            backend.shutdown(socket.SHUT_WR)
            got_reply = bytearray()
            while chunk := await client.recv(1 << 20):
                got_reply += chunk
            if bytes(got_reply) != reply:
                nursery.cancel_scope.cancel()
                return "T7: reply after half-close corrupted"
        if outcome != ["client_eof"]:
            return f"canary ended with {outcome}, not client_eof"
        if stats.bytes_from_client != len(pre_up) + len(bulk) or stats.bytes_to_client != len(
            banner
        ) + len(reply):
            return f"T20: counters {stats!r} differ from the bytes sent"
        left = {k: v for k, v in acc.map_entries().items() if v}
        if left:
            return f"map entries left after the canary: {left}"
        bound = _CANARY_LIMITS.high_watermark + _SKB_MARGIN
        if report.max_backlog > bound:
            return f"T13: backlog reached {report.max_backlog} bytes, over {bound}"
        return None
    finally:
        for s in (gw_a, gw_b):
            s.close()
        client.close()
        backend.close()


async def _recv_exact(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)
