"""The gateway's end of span export: batches of records to the exporter process.

The telemetry plugin hands every sampled connection, as one plain tuple (a
flow record, :mod:`gateway.telemetry.flows`), and the SDK hands other
plugins' spans (span records, :mod:`gateway.telemetry.records`), to
:meth:`ExporterPipe.add`. Records are sent in batches over a
``SOCK_SEQPACKET`` socket pair to a child process
(:mod:`gateway.telemetry.exporter`) that makes spans of them, encodes and
posts them, so that none of that work, and no export thread, competes with
the trio loop for the GIL. A trio task (:meth:`ExporterPipe.run`) sends the last partial batch,
reads the exporter's counts back into :class:`gateway.telemetry.stats.ExportStats`
and restarts an exporter that died.

Rules kept here:

* **Never block the loop.** A batch of :data:`BATCH` records is one
  ``marshal.dumps`` (faster than pickle for tuples of built-in values; both
  ends are the same interpreter) and one non-blocking ``sendmsg``; a message
  is a datagram, so a send takes the whole batch or none of it. When the
  socket is full (the exporter does not keep up) or the exporter is gone,
  the batch is dropped and counted; the exporter's own queue bound
  (``OTEL_BSP_MAX_QUEUE_SIZE``) does the rest.
* **Every span is accounted for.** Spans the exporter drops come back in its
  counts; spans sent to an exporter that died before accounting for them
  are counted as "exporter gone". Warnings go through ``ExportStats``: at most
  one per interval.
* **Bounded exit.** :meth:`close` sends what is left, closes the socket (end
  of file starts the exporter's final flush) and waits at most ``timeout``
  for the process, then kills it.
* **One process, one exporter.** A forked child of the gateway stops sending
  (the socket is its parent's).
* **In-process fallback.** When a child process cannot be started (or
  ``L4GW_TELEMETRY_EXPORT=thread`` asks for it), the same export loop runs in
  a thread of the gateway: slower (it shares the GIL); a warning says so when
  it was not asked for.
"""

from __future__ import annotations

import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import trio

from gateway.linux import SO_SNDBUFFORCE
from gateway.telemetry.exporter import (
    DROP_QUEUE_FULL,
    DROP_UNDELIVERED,
    MAX_MESSAGE,
    MSG_FLUSH,
    MSG_HELLO,
    MSG_SPANS,
    MSG_STATUS,
    ExportLoop,
    parse_status,
)
from gateway.telemetry.flows import safe, span_count
from gateway.telemetry.records import SpanRecord
from gateway.telemetry.stats import ExportStats

log = logging.getLogger("l4gw.telemetry")

BATCH = 256
"""Records per message (about 90 KB): large enough that the send is a small
share of a span's cost, small enough to stay far below the socket's buffer and
below malloc's mmap threshold (128 KB; a bigger message is a fresh mapping,
page faults and all, every time: measured, 1024 was slower)."""

SOCKET_BUFFER = 4 << 20
"""Bytes of batches the socket holds while the exporter is busy (as far as the
kernel allows: ``net.core.wmem_max`` unless root)."""

RESTART_BACKOFF = (1.0, 5.0, 30.0)
"""Seconds before restarting an exporter that died: the first time, the second, then."""

ENV_MODE = "L4GW_TELEMETRY_EXPORT"
"""``process`` (the default) or ``thread``: where spans are encoded and posted."""


class ExporterPipe:
    """Batches records to the exporter process and reads its counts back.

    Args:
        settings: the exporter's settings (exporter, protocol, resource, queue
            and batch sizes, delay, exit timeout); sent as its first message.
        stats: where drops and deliveries are counted.
        mode: "process" or "thread".
    """

    def __init__(
        self, settings: Mapping[str, Any], stats: ExportStats, mode: str = "process"
    ) -> None:
        self.settings = dict(settings)
        self.stats = stats
        self.mode = mode
        self.tick = min(0.2, max(0.01, float(settings["delay"])))
        """Seconds between two sends of a partial batch (and reads of the counts)."""
        self._lock = threading.Lock()
        self._batch: list[SpanRecord] = []
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        # What the current exporter was sent (in spans) and has reported.
        self._sent = 0
        self._reported: tuple[int, int, dict[str, int]] = (0, 0, {})
        self._exported_before = 0
        """Spans delivered by exporters that have ended."""
        self._restarts = 0
        self._restart_at = 0.0
        self._closed = False
        os.register_at_fork(after_in_child=self._forked)

    # --- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the exporter (process, or thread as the fallback)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, theirs):
            _grow_buffer(s)
        hello = MSG_HELLO + marshal.dumps(self.settings)
        ours.send(hello)
        if self.mode == "process":
            try:
                self._proc = _spawn(theirs, self.settings.get("run_as"))
            except OSError as exc:
                log.warning(
                    "telemetry: cannot start the span exporter process (%s); "
                    "exporting from a thread of the gateway (slower)",
                    exc,
                )
                self.mode = "thread"
            else:
                theirs.close()
        if self.mode == "thread":
            # The loop reads the hello like the process would.
            theirs.recv(MAX_MESSAGE)
            loop = ExportLoop(theirs, self.settings)
            self._thread = threading.Thread(
                target=loop.run, name="l4gw-telemetry-export", daemon=True
            )
            self._thread.start()
        ours.setblocking(False)
        self._sock = ours
        self._sent = 0
        self._reported = (0, 0, {})

    @property
    def pid(self) -> int | None:
        """The exporter process's id (None in thread mode or when not running)."""
        return self._proc.pid if self._proc is not None else None

    # --- the hot path -----------------------------------------------------------------------

    def add(self, record: SpanRecord) -> None:
        """Queue one finished span; a full batch is sent at once. Never blocks."""
        with self._lock:
            batch = self._batch
            batch.append(record)
            if len(batch) >= BATCH:
                self._batch = []
                self._send(batch)

    def flush(self) -> None:
        """Send the partial batch now."""
        with self._lock:
            batch, self._batch = self._batch, []
            if batch:
                self._send(batch)

    def _send(self, batch: list[SpanRecord]) -> None:
        """One message for ``batch`` (split when too big); drops are counted. Lock held."""
        sock = self._sock
        if sock is None:
            self.stats.spans_lost(span_count(batch), DROP_UNDELIVERED)
            return
        try:
            data = marshal.dumps(batch)
        except ValueError:
            # A plugin left a value marshal cannot carry on a flow: clean those
            # records (the slow path) and try again.
            try:
                batch = [safe(r) for r in batch]
                data = marshal.dumps(batch)
            except ValueError:
                log.exception("telemetry: a span record cannot be serialized; batch dropped")
                self.stats.spans_lost(span_count(batch), "bad span record")
                return
        if len(data) >= MAX_MESSAGE:
            if len(batch) == 1:
                self.stats.spans_lost(span_count(batch), "span record too large")
                return
            half = len(batch) // 2
            self._send(batch[:half])
            self._send(batch[half:])
            return
        spans = span_count(batch)
        try:
            sock.sendmsg((MSG_SPANS, data))  # gathered by the kernel: no copy here
        except BlockingIOError:
            self.stats.spans_lost(spans, DROP_QUEUE_FULL)
        except OSError:
            # EPIPE/ECONNRESET: the exporter is gone (poll() notices, restarts it).
            self.stats.spans_lost(spans, DROP_UNDELIVERED)
        else:
            self._sent += spans

    # --- the background task ----------------------------------------------------------------

    async def run(self) -> None:
        """Send partial batches, read the counts, restart a dead exporter; forever."""
        while True:
            await trio.sleep(self.tick)
            self.flush()
            self.poll()

    def request_flush(self) -> None:
        """Ask the exporter to export everything it holds now (tests, ``force_flush``)."""
        self.flush()
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.send(MSG_FLUSH)
                except OSError:
                    pass

    def poll(self) -> None:
        """Read the exporter's counts; notice (and in time restart) an exporter that died."""
        sock = self._sock
        if sock is not None:
            self._read_status(sock)
        if self.mode == "process" and not self._closed:
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                self._ended(f"the span exporter process exited with status {proc.returncode}")
            elif proc is None and time.monotonic() >= self._restart_at:
                self.start()

    def _read_status(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            if data[:1] == MSG_STATUS:
                self._account(*parse_status(data[1:])[:4])

    def _account(
        self, received: int, exported: int, dropped: Mapping[str, int], last_error: str
    ) -> None:
        """Turn the exporter's cumulative counts into ExportStats updates."""
        before_dropped = self._reported[2]
        if last_error:
            self.stats.last_error = last_error
        self.stats.spans_exported = self._exported_before + exported
        for reason, count in dropped.items():
            delta = count - before_dropped.get(reason, 0)
            if delta > 0:
                self.stats.spans_lost(delta, reason)
        self._reported = (received, exported, dict(dropped))

    def _ended(self, why: str) -> None:
        """The exporter is gone: count what it never accounted for, plan a restart."""
        self._retire()
        delay = RESTART_BACKOFF[min(self._restarts, len(RESTART_BACKOFF) - 1)]
        self._restarts += 1
        self._restart_at = time.monotonic() + delay
        log.warning("telemetry: %s; restarting it in %gs", why, delay)

    def _retire(self) -> None:
        """Close the socket, count the spans the ended exporter never accounted for."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            self._read_status(sock)
            sock.close()
        _, exported, dropped = self._reported
        lost = self._sent - exported - sum(dropped.values())
        if lost > 0:
            self.stats.spans_lost(lost, DROP_UNDELIVERED)
        self._exported_before += exported
        self._sent = 0
        self._reported = (0, 0, {})
        self._proc = None
        self._thread = None

    # --- stopping ---------------------------------------------------------------------------

    def close(self, timeout: float) -> bool:
        """Send what is left, let the exporter flush, wait at most ``timeout`` seconds.

        Blocking: call after the trio loop (at exit). Idempotent.

        Returns:
            False when the exporter had to be killed (its final flush ran out of time).
        """
        if self._closed or os.getpid() != self._pid:
            return True
        self._closed = True
        self.flush()
        sock = self._sock
        if sock is None:
            return True
        try:
            sock.shutdown(socket.SHUT_WR)  # end of file: the exporter's final flush
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        clean = True
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                clean = False
        elif self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            clean = not self._thread.is_alive()
        self._retire()
        return clean

    def _forked(self) -> None:
        # The socket and the exporter belong to the parent: this process sends
        # nothing, and closes its copy (which would keep the exporter's socket
        # open after the parent is gone).
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._lock = threading.Lock()
        self._proc = None
        self._thread = None
        self._batch = []
        self._closed = True


def _spawn(sock: socket.socket, run_as: tuple[int, int] | None) -> subprocess.Popen[bytes]:
    """``python -m gateway.telemetry.exporter FD`` with ``sock`` as FD; with ``run_as``
    (``[gateway] user``), as that uid and gid from its first instruction: it needs no
    privilege at all."""
    env = dict(os.environ)
    # The child imports this very package, wherever it was imported from.
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    fd = sock.fileno()
    # The child inherits this thread's signal mask: with SIGINT and SIGTERM
    # blocked it cannot die of a Ctrl-C (sent to the whole process group) or a
    # SIGTERM (systemd's, to the whole cgroup) before it has set its own
    # handlers, and then unblocks them (telemetry_exporter._die_with_parent).
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.telemetry.exporter", str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            env=env,
            **_identity(run_as),
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _identity(run_as: tuple[int, int] | None) -> dict[str, Any]:
    """Popen's arguments that start the child as ``run_as`` (only root may)."""
    if run_as is None or os.geteuid() != 0:
        return {}
    uid, gid = run_as
    return {"user": uid, "group": gid, "extra_groups": []}


def _grow_buffer(sock: socket.socket) -> None:
    """As much socket buffer as allowed: batches wait there while the exporter is busy."""
    for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            return
        except OSError:
            continue
