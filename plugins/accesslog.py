"""The access log: one JSON line per connection or UDP session (``[plugin.accesslog]``).

``path = "-"`` writes to stdout, any other value to that file (appending),
``""`` (the default) turns the log off. ``fields`` picks and orders the
fields (default: :data:`DEFAULT_FIELDS`; :data:`EXTRA_FIELDS` can be added).

Rules kept here:

* **Never blocks the event loop.** The close hook formats the line and puts
  it on a bounded queue (``queue_size`` lines); a background task started in
  ``l4gw_startup`` writes batches from a worker thread (``trio.to_thread``). When the disk
  stalls and the queue is full, lines are dropped: counted on the plugin
  and in the ``l4gw.accesslog.dropped`` metric, logged once when dropping
  starts and once with the total when writing resumes.
* **Rotation by rename, then SIGUSR1**: ``l4gw_reopen`` makes the writer
  close the file and open ``path`` again (a new file after a rename).
* **Shutdown flushes** what is queued (the core calls ``l4gw_shutdown``
  after the drain, so every connection's line is in the queue by then).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import trio
from opentelemetry import metrics

from gateway import Config, Field, Flow, Invalid, hookimpl
from gateway import schema as s

log = logging.getLogger("l4gw.accesslog")


_IDLE = frozenset({"l4gw_connection_closed"})


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _trace_id(flow: Flow) -> Any:
    # The telemetry plugin sets it (as a flow field or a span attribute).
    value = getattr(flow, "trace_id", None) or flow.attributes.get("l4gw.trace_id")
    return value if isinstance(value, str) else None


def _attributes(flow: Flow) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool) else repr(v)
        for k, v in flow.attributes.items()
    }


FIELD_VALUES: Final[Mapping[str, Callable[[Flow], Any]]] = {
    "time": lambda f: _rfc3339(f.started),
    "id": lambda f: f.id,
    "listener": lambda f: f.listener,
    "transport": lambda f: f.transport,
    "client": lambda f: s.format_address(*f.client),
    "destination": lambda f: s.format_address(*f.destination),
    "route": lambda f: f.route,
    "cluster": lambda f: f.cluster,
    "endpoint": lambda f: f.endpoint,
    "bytes_from_client": lambda f: f.bytes_from_client,
    "bytes_to_client": lambda f: f.bytes_to_client,
    "duration_ms": lambda f: round(f.duration * 1000, 3),
    "close_reason": lambda f: f.close_reason,
    "spliced": lambda f: f.spliced,
    "tier": lambda f: f.tier,
    "trace_id": _trace_id,
    "refused_by": lambda f: f.refused_by,
    "refused_rule": lambda f: f.refused_rule,
    "error": lambda f: f.error,
    # Not in the default set:
    "end_time": lambda f: _rfc3339(f.ended),
    "sni": lambda f: f.sni,
    "alpn": lambda f: list(f.alpn),
    "attributes": _attributes,
    "datagrams_from_client": lambda f: getattr(f, "datagrams_from_client", 0),
    "datagrams_to_client": lambda f: getattr(f, "datagrams_to_client", 0),
}
"""Every field the log can carry, and how it is read from the flow."""

EXTRA_FIELDS: Final = (
    "end_time",
    "sni",
    "alpn",
    "attributes",
    "datagrams_from_client",
    "datagrams_to_client",
)
"""Fields a ``fields = [...]`` list may add."""
DEFAULT_FIELDS: Final = tuple(name for name in FIELD_VALUES if name not in EXTRA_FIELDS)
"""Fields written when ``fields`` is empty; ``error`` carries a refusal's reason."""


def _field_name(value: Any) -> str:
    name = s.string(value)
    if name not in FIELD_VALUES:
        raise Invalid(f"unknown field {name!r} (known: {', '.join(FIELD_VALUES)})")
    return name


SCHEMA: dict[str, Field] = {
    "path": Field(s.string, "", '"-" (stdout), a file path, or "" (off)'),
    "fields": Field(s.list_of(_field_name), (), "fields to write, in order (empty: the defaults)"),
    "queue_size": Field(
        s.integer(1), 10_000, "lines waiting for the disk; beyond, lines are dropped"
    ),
}


def format_line(flow: Flow, fields: Iterable[str] = DEFAULT_FIELDS) -> str:
    """The JSON line for one closed flow (with its newline)."""
    record = {name: FIELD_VALUES[name](flow) for name in fields}
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n"


_BATCH: Final = 1024
"""Most lines written per call to the worker thread."""


class AccessLog:
    """The ``accesslog`` plugin.

    Args:
        meter_provider: where the metrics go (default: the global one).
    """

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self.path = ""
        self.fields: tuple[str, ...] = DEFAULT_FIELDS
        self.queue_size = 10_000
        self.written = 0
        self.dropped = 0
        self.reopened = 0
        self._dropped_reported = 0
        self._dropping = False
        self._queue: deque[str] = deque()
        """Lines not yet written; only the holder of ``_lock`` takes them out,
        so none is lost or written twice whoever writes (writer or shutdown)."""
        self._wake = trio.Event()
        self._file: TextIO | None = None
        self._file_path = ""
        self._reopen = False
        self._lock = threading.Lock()
        """Held by whoever touches the file or takes lines: the writer thread, shutdown."""
        meter = metrics.get_meter("l4gw.accesslog", meter_provider=meter_provider)
        self._m_written = meter.create_counter("l4gw.accesslog.written", "{line}", "lines written")
        self._m_dropped = meter.create_counter(
            "l4gw.accesslog.dropped", "{line}", "lines dropped because the queue was full"
        )

    # -- the connection path -----------------------------------------------------

    def record(self, flow: Flow) -> None:
        """Queue ``flow``'s line, or drop it when the queue is full."""
        if not self.path:
            return
        if len(self._queue) >= self.queue_size:
            self.dropped += 1
            self._m_dropped.add(1)
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "accesslog: queue of %d lines full (is %s stalled?): dropping lines",
                    self.queue_size,
                    self.path,
                )
            return
        self._queue.append(format_line(flow, self.fields))
        self._wake.set()

    # -- the writer ----------------------------------------------------------------

    async def writer(self) -> None:
        """Write queued lines in batches from a worker thread, until cancelled."""
        while True:
            if not self._queue and not self._reopen:
                self._wake = trio.Event()
                await self._wake.wait()
            await trio.to_thread.run_sync(self._write_queued, abandon_on_cancel=True)
            self._report_drops()

    def _report_drops(self) -> None:
        if self.dropped != self._dropped_reported:
            log.warning(
                "accesslog: writing again; %d lines were dropped (%d in all)",
                self.dropped - self._dropped_reported,
                self.dropped,
            )
            self._dropped_reported = self.dropped
        self._dropping = False

    def _write_queued(self, limit: int = _BATCH) -> None:
        """Write up to ``limit`` queued lines; runs in a worker thread and may
        block on the disk."""
        with self._lock:
            if self._reopen or self._file_path != self.path:
                was_open = self._file is not None
                self._close_file()
                self._reopen = False
                if was_open:
                    self.reopened += 1
                    log.info("accesslog: reopening %s", self.path)
            if not self._queue or not self.path:
                return
            if self._file is None:
                self._file = self._open(self.path)
                self._file_path = self.path
            lines: list[str] = []
            while self._queue and len(lines) < limit:
                lines.append(self._queue.popleft())
            self._file.write("".join(lines))
            self._file.flush()
        self.written += len(lines)
        self._m_written.add(len(lines))

    @staticmethod
    def _open(path: str) -> TextIO:
        if path == "-":
            return sys.stdout
        return open(path, "a", encoding="utf-8")

    def _close_file(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            try:
                self._file.close()
            except OSError as exc:
                log.error("accesslog: closing %s: %s", self._file_path, exc)
        self._file = None
        self._file_path = ""

    def flush(self, timeout: float = 2.0) -> None:
        """Write everything queued, synchronously, and close the file (shutdown)."""
        if not self._lock.acquire(timeout=timeout):
            log.error(
                "accesslog: %s is stalled; %d lines lost at shutdown", self.path, len(self._queue)
            )
            return
        self._lock.release()
        try:
            while self._queue and self.path:
                self._write_queued(limit=len(self._queue))
        except OSError as exc:
            log.error("accesslog: %s: %s; %d lines lost", self.path, exc, len(self._queue))
        with self._lock:
            self._close_file()

    async def _run_writer(self) -> None:
        while True:
            try:
                await self.writer()
            except OSError as exc:
                # A full disk or a removed directory must not end the log for good.
                log.error("accesslog: %s: %s; retrying in 1s", self.path, exc)
                with self._lock:
                    self._close_file()
                await trio.sleep(1.0)

    # -- hooks -----------------------------------------------------------------------

    def configure(self, section: Mapping[str, Any]) -> None:
        self.path = section.get("path", "")
        self.fields = tuple(section.get("fields") or DEFAULT_FIELDS)
        self.queue_size = section.get("queue_size", 10_000)
        self._wake.set()  # a new path is opened at once

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._run_writer)

    def reopen(self) -> None:
        self._reopen = True
        self._wake.set()

    @hookimpl
    def l4gw_config_sections(self) -> Mapping[str, Mapping[str, Field]]:
        return {"accesslog": SCHEMA}

    @hookimpl
    def l4gw_configure(self, config: Config) -> frozenset[str] | None:
        self.configure(config.plugin("accesslog"))
        # Off: no line to format. A connection keeps the hooks it started with, so
        # turning the log on by a reload logs the connections that start after it.
        return None if self.path else _IDLE

    @hookimpl
    def l4gw_startup(self, config: Config, nursery: trio.Nursery) -> None:
        self.start(nursery)

    @hookimpl
    def l4gw_connection_closed(self, flow: Flow) -> None:
        self.record(flow)

    @hookimpl
    def l4gw_reopen(self) -> None:
        self.reopen()

    @hookimpl
    def l4gw_shutdown(self, config: Config) -> None:
        self.flush()


plugin = AccessLog()
"""The instance the ``accesslog`` entry point registers."""
