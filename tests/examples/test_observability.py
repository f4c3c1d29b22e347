"""examples/observability/: every metric the Grafana dashboard and the Prometheus rules
use is one a real gateway exports on ``/metrics``.

The gateway runs with two workers and a config that makes every metric appear (a
served connection moved by splice, a refused one, a failed connect, health checks);
its ``/metrics`` text gives the sample names, Prometheus suffixes included
(``_total``, ``_bucket``, ``_sum``, ``_count``, unit suffixes such as ``_seconds`` and
``_bytes``). The PromQL of every panel and rule is reduced to the metric names it
selects (functions, keywords, label matchers, groupings and ranges removed).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from adminhttp import get
from backends import echo_server, recv_all, recv_exactly
from gwproc import free_port

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "observability" / "grafana-dashboard.json"
RULES = ROOT / "examples" / "observability" / "prometheus-rules.yaml"

SYNTHESIZED = {"up"}
"""Series Prometheus makes itself at each scrape, not read from /metrics."""
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def dashboard_exprs() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(document["panels"])
    for variable in document["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and query.startswith("label_values("):
            exprs.append(query[len("label_values(") : query.rindex(",")])
    return exprs


def rule_exprs() -> list[str]:
    document = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|s|m|h|d|w|y)?\b", " ", text)  # numbers
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = m.group(0)
        following = text[m.end() :].lstrip()
        if following.startswith("(") or name.lower() in KEYWORDS:
            continue  # a function, or a keyword
        if text[: m.start()].endswith("$"):
            continue  # a Grafana variable
        names.add(name)
    return names


def test_expressions_are_read_as_expected():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, l4gw_cluster) (rate(x_bucket{a="b(c)"}[5m])))'
    ) == {"x_bucket"}
    assert metric_names("a_total / ignoring(x) b > 0.5 and on (i) c offset 5m") == {
        "a_total",
        "b",
        "c",
    }


def config(ports: dict[str, int], backend: int, dead: int) -> str:
    return f"""
[gateway]
workers = 2
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:{ports["public"]}"

[[listener]]
name = "nowhere"
bind = "127.0.0.1:{ports["nowhere"]}"

[[listener]]
name = "dead"
bind = "127.0.0.1:{ports["dead"]}"

[[route]]
name = "echo"
listener = "public"
cluster = "echo"

[[route]]
name = "gone"
listener = "dead"
cluster = "gone"

[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[cluster.echo.health_check]
interval = "1s"

[cluster.gone]
endpoints = ["127.0.0.1:{dead}"]
connect_attempts = 1

[plugin.relay]
tiers = ["splice", "copy"]
promote_after_bytes = 0
promote_after = "0s"

[admin]
bind = "127.0.0.1:{ports["admin"]}"
"""


def scrape(port: int) -> str:
    status, body = get(port, "/metrics")
    assert status == 200, body
    return body.decode()


async def test_dashboard_and_rules_use_only_exported_metrics(nursery, gateway):
    backend = await nursery.start(echo_server)
    ports = {name: free_port() for name in ("public", "nowhere", "dead", "admin")}
    gateway(config(ports, backend, free_port()))
    with trio.fail_after(40):
        payload = os.urandom(256 * 1024)
        stream = await trio.open_tcp_stream("127.0.0.1", ports["public"])
        async with stream:
            await stream.send_all(payload)
            assert await recv_exactly(stream, len(payload)) == payload
        for name in ("nowhere", "dead"):
            stream = await trio.open_tcp_stream("127.0.0.1", ports[name])
            async with stream:
                assert await recv_all(stream) == b""
        wanted = {
            "l4gw_connection_spliced_total",
            "l4gw_connection_refused_total",
            "l4gw_health_checks_total",
            "l4gw_endpoint_healthy",
        }
        while True:
            text = await trio.to_thread.run_sync(scrape, ports["admin"])
            exported = {
                sample.name
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }
            closed = re.findall(r"^l4gw_connection_closed_total\{.*\} (\S+)$", text, re.M)
            if wanted <= exported and sum(float(v) for v in closed) >= 3:
                break
            await trio.sleep(0.2)

    used: dict[str, set[str]] = {}
    for source, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(source)
    assert {"dashboard", "rules"} <= {s for sources in used.values() for s in sources}
    missing = {
        name: sorted(sources)
        for name, sources in used.items()
        if name not in exported and name not in SYNTHESIZED
    }
    assert missing == {}, f"not in /metrics: {missing}; exported: {sorted(exported)}"
