"""``[gateway] log_format = "json"``: the gateway's own log as one JSON object per line.

Log shippers (Fluent Bit, Vector, Promtail, the OpenTelemetry Collector's
filelog receiver) parse a JSON line without a per-format regex, and a message
with a newline in it (a config report) stays one record. Each line holds:

* ``time``: RFC 3339, UTC, milliseconds (``2026-12-06T02:30:00.123Z``);
* ``level``: ``debug``, ``info``, ``warning``, ``error`` or ``critical``;
* ``logger``: the logger's name (``l4gw.conn``, ``l4gw.plugins``, ...);
* ``message``: the formatted message;
* ``connection_id`` and ``trace_id`` where there is one: given by the call
  (``extra={"connection_id": ..., "trace_id": ...}``, as the close lines do), or
  else taken from the connection whose hooks are running, when it is sampled
  (its span is then current: gateway/telemetry/context.py);
* ``pid`` with ``[gateway] workers`` above 1; ``exception`` with the traceback
  when there is one.

The access log is a plugin with its own format and destination; this is only
the gateway's diagnostic log on stderr. A reload that changes the format applies
it from the next line (:func:`follow`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Config

LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring).

    Args:
        pid: add the process id (several workers write to one stream).
    """

    def __init__(self, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": LEVELS.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "message": record.getMessage(),
        }
        connection_id = getattr(record, "connection_id", None)
        trace_id = getattr(record, "trace_id", None)
        if connection_id is None:
            span = _current_flow_span()
            if span is not None:
                connection_id = span.flow.id
                trace_id = trace_id or f"{span.trace_id:032x}"
        if connection_id is not None:
            out["connection_id"] = connection_id
        if trace_id is not None:
            out["trace_id"] = trace_id
        if self.pid:
            out["pid"] = record.process
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _current_flow_span() -> Any:
    """The sampled connection whose hooks run now, or None. The OpenTelemetry API is
    only looked at when telemetry loaded it (no import for a log line)."""
    context = sys.modules.get("gateway.telemetry.context")
    if context is None:
        return None
    return context.current_flow_span()


_handlers: list[logging.Handler] = []
"""The handlers :func:`install` formats: a reload changes their format."""


def install(handler: logging.Handler, log_format: str, workers: int = 1) -> None:
    """Format ``handler`` per ``[gateway] log_format``, and again when a reload changes it."""
    handler.setFormatter(formatter(log_format, workers))
    _handlers.append(handler)


def follow(config: Config) -> None:
    """A reload: apply its ``log_format`` to the installed handlers (from the next line)."""
    for handler in _handlers:
        handler.setFormatter(formatter(config.gateway.log_format, config.gateway.workers))


def formatter(log_format: str, workers: int = 1) -> logging.Formatter:
    """The formatter of ``[gateway] log_format`` ("text" or "json")."""
    if log_format == "json":
        return JsonFormatter(pid=workers > 1)
    pid = " [%(process)d]" if workers > 1 else ""
    return logging.Formatter(f"%(asctime)s %(levelname)s{pid} %(name)s: %(message)s")
