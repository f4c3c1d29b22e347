"""The span exporter process: records in from the gateway, OTLP (or console) out.

``python -m gateway.telemetry.exporter FD`` is started by the gateway
(:mod:`gateway.telemetry.pipe`) with one end of a ``SOCK_SEQPACKET`` socket
pair as ``FD``. Making, encoding and posting spans here, in a process of its
own, keeps that CPU off the gateway's interpreter: an export thread inside
the gateway competed with the trio loop for the GIL and cost a quarter to a
third of its connections per second (``bench/telemetry_overhead.py``,
docs/observability.md).

Messages (each one datagram of the socket pair, first byte the kind, the rest
``marshal`` data, both ends the same interpreter):

* gateway → exporter: ``H`` the settings (first message, once), ``S`` a list
  of records (the gateway's flow records, :mod:`gateway.telemetry.flows`,
  each one a SERVER span plus a CLIENT span per connect attempt and counted
  as that many spans, and other plugins' span records,
  :mod:`gateway.telemetry.records`), ``F`` "export what you hold now"; end
  of file means the gateway is stopping.
* exporter → gateway: ``T`` the cumulative counts (received, exported,
  dropped by reason) and the last exporter error, after each export and
  before exiting.

Rules kept here:

* **The batch processor's contract.** Records wait in a queue of at most
  ``queue_size`` spans (``OTEL_BSP_MAX_QUEUE_SIZE``); a batch of
  ``batch_size`` (``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``) goes out as soon as it
  is full, a smaller one after ``delay`` (``OTEL_BSP_SCHEDULE_DELAY``).
  Spans that do not fit in the queue, and every span of a batch the exporter
  could not deliver, are counted as dropped, never logged one by one.
* **The exporter dies with the gateway, after a bounded flush.** End of
  file on the socket (the gateway closed it, exited or was killed) starts the
  final flush, which gets ``exit_timeout`` seconds and is skipped when the
  last export failed (the collector is unreachable). ``PR_SET_PDEATHSIG``
  covers a socket some other process still holds. SIGINT (Ctrl-C reaches
  the whole process group) and SIGTERM (``systemctl stop`` reaches the whole
  cgroup) are ignored while the gateway lives: it is still draining, and its
  last spans are on their way.
* **Every error ends up in the counts.** The exporters' own log lines are
  folded into "last error" (the gateway's rate-limited warning prints it).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import marshal
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gateway.linux import PR_SET_PDEATHSIG
from gateway.telemetry.flows import expand, spans_of
from gateway.telemetry.records import SpanRecord, to_readable

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

log = logging.getLogger("l4gw.telemetry.exporter")

MSG_HELLO = b"H"
MSG_SPANS = b"S"
MSG_FLUSH = b"F"
MSG_STATUS = b"T"

MAX_MESSAGE = 1 << 20
"""Largest message; the gateway splits a batch that would be bigger."""

DROP_QUEUE_FULL = "export queue full"
DROP_EXPORT_FAILED = "export failed"
DROP_STOPPING = "exporter stopping"
DROP_UNDELIVERED = "exporter gone"
"""Counted by the gateway: spans it sent that the exporter never accounted for."""


class Counts:
    """What the exporter did with the spans it received (cumulative)."""

    def __init__(self) -> None:
        self.received = 0
        self.exported = 0
        self.dropped: dict[str, int] = {}
        self.last_error = ""

    def drop(self, reason: str, count: int) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def message(self, final: bool = False) -> bytes:
        return MSG_STATUS + marshal.dumps(
            (self.received, self.exported, dict(self.dropped), self.last_error, final)
        )


def parse_status(payload: bytes) -> tuple[int, int, dict[str, int], str, bool]:
    """The fields of a status message (without its kind byte)."""
    received, exported, dropped, last_error, final = marshal.loads(payload)
    return int(received), int(exported), dict(dropped), str(last_error), bool(final)


class _ErrorLog(logging.Handler):
    """Keeps the exporters' own warnings as "last error" instead of a line per batch."""

    def __init__(self, counts: Counts) -> None:
        super().__init__(logging.WARNING)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.counts.last_error = record.getMessage()[:300]
        except Exception:
            pass


# --- exporters of records -------------------------------------------------------------------


class RecordExporter(Protocol):
    """Delivers batches of records (span, flow or attempt records) somewhere."""

    def export(self, records: Sequence[SpanRecord]) -> bool:
        """True when the batch was delivered."""
        ...

    def shutdown(self) -> None:
        """Stop now: a retry in progress gives up, later exports fail at once."""
        ...


def record_exporter(settings: Mapping[str, Any]) -> RecordExporter:
    """The exporter ``settings`` ask for: "console", or OTLP over HTTP/protobuf or gRPC.

    Everything but the encoding is the SDK's exporters': endpoint, headers,
    TLS, compression, timeout and retries come from the standard variables.
    """
    from opentelemetry.sdk.resources import Resource

    attributes, schema_url = settings["resource"]
    resource = Resource(dict(attributes), schema_url or None)
    if settings["exporter"] == "console":
        return _ConsoleRecords(resource)
    if settings["protocol"] == "grpc":
        return _GrpcRecords(resource)
    return _HttpRecords(resource)


class _HttpRecords:
    def __init__(self, resource: Resource) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        from gateway.telemetry.otlp import SpanEncoder

        self.resource = resource
        self.sdk = OTLPSpanExporter()
        self.encoder = SpanEncoder()
        self.stopped = False

    def export(self, records: Sequence[SpanRecord]) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult

        if self.stopped:
            return False
        client = getattr(self.sdk, "_client", None)
        if client is None or not hasattr(client, "export"):
            # Not the exporter this was written against: its own (slower) path.
            spans = [to_readable(spans_of(r), self.resource) for r in records]
            return self.sdk.export(spans) is SpanExportResult.SUCCESS
        return bool(client.export(self.encoder.encode_records(records, self.resource)).success)

    def shutdown(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.sdk.shutdown()  # type: ignore[no-untyped-call]


class _GrpcRecords:
    def __init__(self, resource: Resource) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        from gateway.telemetry.otlp import SpanEncoder

        encoder = SpanEncoder()

        class Exporter(OTLPSpanExporter):
            # The SDK's exporter (channel, retries, metadata from the variables)
            # with records in and the fast encoder's request out.
            def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
                request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(
                    encoder.encode_records(data, resource)
                )
                return request

        self.sdk = Exporter()
        self.stopped = False

    def export(self, records: Sequence[SpanRecord]) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult

        if self.stopped:
            return False
        return self.sdk.export(records) is SpanExportResult.SUCCESS  # type: ignore[arg-type]

    def shutdown(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.sdk.shutdown()


class _ConsoleRecords:
    def __init__(self, resource: Resource) -> None:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        self.resource = resource
        self.sdk = ConsoleSpanExporter()
        self.names: dict[tuple[str, Any], str] = {}

    def export(self, records: Sequence[SpanRecord]) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult

        spans = [to_readable(spans_of(r, self.names), self.resource) for r in records]
        return self.sdk.export(spans) is SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


# --- the batch processor ---------------------------------------------------------------------


class ExportLoop:
    """The batch processor of the exporter process (or of the fallback thread).

    One thread does everything: it reads messages from the socket while the
    queue waits for a full batch or for its delay, and exports in between.
    While an export is in progress, new batches wait in the socket's buffer
    (the gateway counts what does not fit as dropped); with no second thread
    there is no hand-over between threads per message.
    """

    IDLE_WAKEUP = 1.0
    """Seconds between two looks at :meth:`close` when nothing arrives."""

    def __init__(self, sock: socket.socket, settings: Mapping[str, Any]) -> None:
        self.sock = sock
        self.queue_size = int(settings["queue_size"])
        self.batch_size = max(1, min(int(settings["batch_size"]), self.queue_size))
        self.delay = float(settings["delay"])
        self.exit_timeout = float(settings["exit_timeout"])
        self.counts = Counts()
        self.exporter = record_exporter(settings)
        self._queue: collections.deque[SpanRecord] = collections.deque()
        self._closing = False
        self._flush = False
        self._first_at = 0.0
        self._deadline = 0.0
        self._failing = False

    def close(self) -> None:
        """Finish: export what is queued (bounded) and return from :meth:`run`.

        May be called from a signal handler or another thread. The bound
        starts now: an export in progress (a collector that went away,
        retries with backoff) is cut short when it runs out.
        """
        if self._closing:
            return
        self._deadline = time.monotonic() + self.exit_timeout
        self._closing = True
        watchdog = threading.Timer(self.exit_timeout, self._abort)
        watchdog.daemon = True
        watchdog.start()

    def run(self) -> None:
        """Read and export until the socket ends (or :meth:`close`), then the final flush."""
        # One buffer for every message: recv(n) would allocate n bytes each time.
        buffer = bytearray(MAX_MESSAGE)
        view = memoryview(buffer)
        sock, queue = self.sock, self._queue
        while not self._closing:
            if self._flush:
                self._flush = False
                batches = self._take_all()
                for batch in batches:
                    self._export(batch)
                if not batches:
                    self.report()
                continue
            if len(queue) >= self.batch_size:
                self._export(self._take())
                self._first_at = time.monotonic()
                continue
            timeout = self.IDLE_WAKEUP
            if queue:
                # A partial batch waits at most ``delay`` from its first span.
                timeout = self._first_at + self.delay - time.monotonic()
                if timeout <= 0:
                    self._export(self._take())
                    self._first_at = time.monotonic()
                    continue
            sock.settimeout(min(timeout, self.IDLE_WAKEUP))
            try:
                n = sock.recv_into(buffer)
            except TimeoutError:
                continue
            except OSError:
                break
            if not n:
                break  # end of file: the gateway is stopping (or gone)
            self._receive(view, n)
        self.close()
        self._final_flush()

    def _receive(self, view: memoryview, n: int) -> None:
        kind = view[:1]
        try:
            if kind == MSG_SPANS:
                self._enqueue(expand(marshal.loads(view[1:n])))
            elif kind == MSG_FLUSH:
                self._flush = True
        except Exception as exc:  # a message this version cannot read: skip it
            self.counts.last_error = f"unreadable message from the gateway: {exc!r}"[:300]

    def _enqueue(self, records: list[SpanRecord]) -> None:
        self.counts.received += len(records)
        queue = self._queue
        room = self.queue_size - len(queue)
        if room < len(records):
            self.counts.drop(DROP_QUEUE_FULL, len(records) - max(room, 0))
            records = records[: max(room, 0)]
        if records and not queue:
            self._first_at = time.monotonic()
        queue.extend(records)

    def _take(self) -> list[SpanRecord]:
        queue = self._queue
        n = min(self.batch_size, len(queue))
        return [queue.popleft() for _ in range(n)]

    def _take_all(self) -> list[list[SpanRecord]]:
        batches = []
        while self._queue:
            batches.append(self._take())
        return batches

    def _export(self, batch: list[SpanRecord]) -> None:
        if not batch:
            return
        try:
            ok = self.exporter.export(batch)
        except Exception as exc:
            self.counts.last_error = repr(exc)[:300]
            ok = False
        self._failing = not ok
        if ok:
            self.counts.exported += len(batch)
        else:
            self.counts.drop(DROP_EXPORT_FAILED, len(batch))
        self.report()

    def _final_flush(self) -> None:
        batches = self._take_all()
        if self._failing:
            # The collector did not take the last batch: waiting for it again
            # would only delay the gateway's exit.
            self.counts.drop(DROP_STOPPING, sum(len(b) for b in batches))
            batches = []
        try:
            for i, batch in enumerate(batches):
                if time.monotonic() >= self._deadline or self._failing:
                    self.counts.drop(DROP_STOPPING, sum(len(b) for b in batches[i:]))
                    break
                self._export(batch)
        finally:
            self.exporter.shutdown()
        self.report(final=True)

    def _abort(self) -> None:
        """The final flush ran out of time: cut the exporter's retries short."""
        self.counts.last_error = self.counts.last_error or "final flush timed out"
        self.exporter.shutdown()

    def report(self, final: bool = False) -> None:
        """Send the counts to the gateway (which may be gone: then nothing to do)."""
        try:
            self.sock.send(self.counts.message(final), socket.MSG_DONTWAIT)
        except OSError:
            pass


# --- the process ---------------------------------------------------------------------------


def _die_with_parent(parent: int, loop: list[ExportLoop]) -> None:
    """SIGTERM from the kernel when the gateway dies; ignored while it lives."""

    def on_term(signum: int, frame: Any) -> None:
        if os.getppid() != parent and loop:
            loop[0].close()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # The gateway started this process with both blocked (telemetry_pipe._spawn).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the exporter process: ``FD`` is its end of the socket pair."""
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    parent = os.getppid()
    loops: list[ExportLoop] = []
    _die_with_parent(parent, loops)
    hello = sock.recv(MAX_MESSAGE)
    if hello[:1] != MSG_HELLO:
        return 2
    settings = marshal.loads(hello[1:])
    logging.basicConfig(
        level=int(settings.get("log_level", logging.WARNING)),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _step_aside(int(settings.get("nice", 0)))
    loop = ExportLoop(sock, settings)
    loops.append(loop)
    _fold_exporter_logs(loop.counts)
    if os.getppid() != parent:  # the gateway died before the handler was in place
        loop.close()
    loop.run()
    sys.stdout.flush()
    # A retry still sleeping in a non-daemon thread of an SDK exporter must not
    # keep the process alive past the bounded flush.
    os._exit(0)


def _step_aside(niceness: int) -> None:
    """Lower this process's priority below the gateway's.

    SCHED_BATCH: a batch of spans arriving wakes the exporter without
    preempting the gateway that sent it (a woken task may otherwise take the
    sender's CPU at once); ``niceness`` gives it a smaller share when CPU is
    short. Spans wait (and, past the queue bound, are counted as dropped);
    connections do not.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):
        pass
    if niceness:
        try:
            os.nice(niceness)
        except OSError:
            pass


def _fold_exporter_logs(counts: Counts) -> None:
    """The SDK exporters' warnings become "last error", unless at debug level."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    for name in ("opentelemetry.exporter", "opentelemetry.sdk"):
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.addHandler(_ErrorLog(counts))


if __name__ == "__main__":
    sys.exit(main())
