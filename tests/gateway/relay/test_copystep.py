"""The compiled copy loop (gateway/relay/_copystep.c) on real sockets: every way it
stops, the bytes it moves and the ones it leaves, and its argument checks."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import termios
import time

import pytest

from relay_helpers import payload, require_compiled_copy_step

require_compiled_copy_step()

from gateway.relay import _copystep as step  # noqa: E402  (after the check above)

NO_LIMIT = 0


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


@pytest.fixture
def pairs():
    """src_peer → src (read by move) and dst → dst_peer (written by move)."""
    src_peer, src = _tcp_pair()
    dst, dst_peer = _tcp_pair()
    yield src_peer, src, dst, dst_peer
    for s in (src_peer, src, dst, dst_peer):
        s.close()


def _drain(sock: socket.socket) -> bytes:
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def _feed(sock: socket.socket, data: bytes) -> None:
    sock.setblocking(True)
    sock.sendall(data)
    sock.setblocking(False)


def _settle(sock: socket.socket, n: int) -> None:
    """Wait until ``sock`` has ``n`` bytes queued to read (loopback delivers at once,
    but the test should not depend on it)."""
    for _ in range(1000):
        queued = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
        if queued >= n:
            return
        time.sleep(0.001)
    raise AssertionError(f"only {queued} of {n} bytes arrived")


def test_nothing_to_read_is_drained(pairs):
    _, src, dst, _ = pairs
    assert step.move(bytearray(64), src.fileno(), dst.fileno(), 16, True, NO_LIMIT) == (
        step.DRAINED,
        0,
        0,
        0,
        0,
    )


@pytest.mark.parametrize(
    ("stop_short", "status"),
    [(True, step.SHORT), (False, step.DRAINED)],
    ids=["a-short-read-stops-it", "else-it-reads-to-eagain"],
)
def test_one_short_chunk_moves_exactly(pairs, stop_short, status):
    src_peer, src, dst, dst_peer = pairs
    data = payload(1000, 1)
    _feed(src_peer, data)
    _settle(src, len(data))
    out = step.move(bytearray(4096), src.fileno(), dst.fileno(), 16, stop_short, NO_LIMIT)
    assert out == (status, 1000, 1, 0, 0)
    _settle(dst_peer, len(data))
    assert _drain(dst_peer) == data


def test_the_budget_stops_it_and_the_rest_waits_in_the_source(pairs):
    src_peer, src, dst, dst_peer = pairs
    data = payload(100, 3)
    _feed(src_peer, data)
    _settle(src, len(data))
    out = step.move(bytearray(16), src.fileno(), dst.fileno(), 3, True, NO_LIMIT)
    assert out == (step.BUDGET, 48, 3, 0, 0)
    _settle(dst_peer, 48)
    assert _drain(dst_peer) == data[:48]
    out = step.move(bytearray(16), src.fileno(), dst.fileno(), 16, True, NO_LIMIT)
    assert out == (step.SHORT, 52, 4, 0, 0)  # 16 + 16 + 16 + 4: the last one short
    _settle(dst_peer, 52)
    assert _drain(dst_peer) == data[48:]


def test_the_limit_stops_it_at_the_chunk_that_reaches_it(pairs):
    src_peer, src, dst, dst_peer = pairs
    data = payload(100, 4)
    _feed(src_peer, data)
    _settle(src, len(data))
    out = step.move(bytearray(16), src.fileno(), dst.fileno(), 16, True, 20)
    assert out == (step.LIMIT, 32, 2, 0, 0)
    _settle(dst_peer, 32)
    assert _drain(dst_peer) == data[:32]


def test_an_end_after_bytes_moves_them_first(pairs):
    src_peer, src, dst, dst_peer = pairs
    data = payload(300, 5)
    _feed(src_peer, data)
    src_peer.shutdown(socket.SHUT_WR)
    _settle(src, len(data))
    out = step.move(bytearray(128), src.fileno(), dst.fileno(), 16, False, NO_LIMIT)
    assert out == (step.END, 300, 3, 0, 0)
    _settle(dst_peer, len(data))
    assert _drain(dst_peer) == data


def test_a_congested_destination_leaves_the_rest_of_the_chunk_held(pairs):
    src_peer, src, dst, dst_peer = pairs
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    dst_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    scratch = bytearray(65536)
    data = payload(4 << 20, 6)
    fed = written = 0
    while True:
        # Feed what the source's queue takes; the destination's peer reads nothing.
        try:
            fed += src_peer.send(data[fed : fed + 65536])
        except BlockingIOError:
            pass
        status, moved, chunks, sent, held = step.move(
            scratch, src.fileno(), dst.fileno(), 16, False, NO_LIMIT
        )
        written += moved
        if status == step.HELD:
            break
        assert status in (step.DRAINED, step.BUDGET), status
        assert fed < len(data), "the destination never pushed back"
    assert 0 <= sent < held <= len(scratch)
    assert moved <= chunks * len(scratch)  # whole chunks only: the held one is not in it
    # The whole chunks and the taken part of the held one reach the peer; the rest is
    # the caller's to keep. All of it, in order, is the source's stream so far.
    written += sent
    dst_peer.settimeout(10)
    got = bytearray()
    while len(got) < written:
        got += dst_peer.recv(written - len(got))
    got += scratch[sent:held]
    assert bytes(got) == data[: len(got)]


def test_a_reset_source_is_a_source_error(pairs):
    src_peer, src, dst, _ = pairs
    src_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    src_peer.close()
    for _ in range(1000):
        out = step.move(bytearray(64), src.fileno(), dst.fileno(), 16, True, NO_LIMIT)
        if out[0] != step.DRAINED:
            break
    assert out == (step.SRC_ERROR, 0, 0, errno.ECONNRESET, 0)


def test_a_gone_destination_is_a_destination_error(pairs):
    src_peer, src, dst, dst_peer = pairs
    dst_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    dst_peer.close()
    data = payload(100, 7)
    _feed(src_peer, data)
    _settle(src, len(data))
    status, moved, chunks, err, _ = step.move(
        bytearray(64), src.fileno(), dst.fileno(), 16, True, NO_LIMIT
    )
    assert (status, moved, chunks) == (step.DST_ERROR, 0, 0)
    assert err in (errno.ECONNRESET, errno.EPIPE)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((bytearray(8), 0, 1, 16, True), TypeError),  # five arguments
        ((bytearray(8), -1, 1, 16, True, 0), ValueError),
        ((bytearray(8), 0, 1, 0, True, 0), ValueError),  # no budget
        ((bytearray(0), 0, 1, 16, True, 0), ValueError),  # nowhere to read into
        ((b"read-only", 0, 1, 16, True, 0), BufferError),
        ((bytearray(8), "0", 1, 16, True, 0), TypeError),
    ],
)
def test_bad_arguments_are_errors_not_crashes(args, error):
    with pytest.raises(error):
        step.move(*args)
