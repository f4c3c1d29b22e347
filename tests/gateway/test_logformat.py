"""gateway.logformat: one JSON object per line, with the connection and trace ids
where there are some."""

from __future__ import annotations

import io
import json
import logging
import re

from gateway.logformat import JsonFormatter, formatter
from gateway.telemetry.context import FlowSpan
from gateway.testing import make_flow


def lines(fmt: logging.Formatter, emit) -> list[dict]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    logger = logging.getLogger("l4gw.test.logformat")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_fields_and_ids():
    flow = make_flow()
    span = FlowSpan(flow, 0x1234, 0x99, None)

    def emit(log: logging.Logger) -> None:
        log.info("plain %s", "message\nwith a newline")
        log.warning("closed", extra={"connection_id": 7, "trace_id": None})
        span.attach()
        try:
            log.error("inside a sampled connection's hook")
        finally:
            span.detach()
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

    first, second, third, fourth = lines(JsonFormatter(), emit)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first["level"] == "info" and first["logger"] == "l4gw.test.logformat"
    assert first["message"] == "plain message\nwith a newline"
    assert "connection_id" not in first and "trace_id" not in first and "pid" not in first
    assert second["connection_id"] == 7 and "trace_id" not in second
    assert third["connection_id"] == flow.id and third["trace_id"] == f"{0x1234:032x}"
    assert fourth["level"] == "error" and "ValueError: boom" in fourth["exception"]


def test_text_stays_text_and_workers_add_the_pid():
    assert not isinstance(formatter("text"), JsonFormatter)
    (record,) = lines(formatter("json", workers=2), lambda log: log.info("x"))
    assert isinstance(record["pid"], int)


def test_a_reload_changes_the_format_of_the_installed_handler():
    from dataclasses import replace

    from gateway import logformat
    from gateway.testing import make_config

    handler = logging.StreamHandler(io.StringIO())
    logformat.install(handler, "text")
    try:
        assert not isinstance(handler.formatter, JsonFormatter)
        config = make_config('[gateway]\nlog_format = "json"\n')
        logformat.follow(config)
        assert isinstance(handler.formatter, JsonFormatter)
        logformat.follow(replace(config, gateway=replace(config.gateway, log_format="text")))
        assert not isinstance(handler.formatter, JsonFormatter)
    finally:
        logformat._handlers.remove(handler)
