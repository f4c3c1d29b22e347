"""gateway/effective.py: the configuration ``/config`` shows, defaults filled in."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from gateway.config import from_dict
from gateway.effective import effective_config, format_duration
from l4gw_plugins.ratelimit.plugin import SCHEMA

FILE = """
[gateway]
drain_timeout = "5s"

[[listener]]
name = "public"
bind = "127.0.0.1:8443"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:2", {{ address = "127.0.0.1:3", weight = 2 }}]
health_check = {{ interval = "2s" }}

[admin]
bind = "127.0.0.1:9901"
token_file = "{token}"

[plugin.ratelimit]
backend = "redis"
redis_url = "redis://gw:hunter2@127.0.0.1:6379/0"
per_client = {{ rate = 5 }}
"""


def test_defaults_are_filled_in_as_the_file_would_write_them(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken-value\n")
    raw = tomllib.loads(FILE.format(token=token))
    config = from_dict(raw, "t.toml", {"ratelimit": SCHEMA})
    doc = effective_config(config, {"ratelimit": SCHEMA})
    text = json.dumps(doc)
    assert "hunter2" not in text and "t0ken-value" not in text
    assert doc["gateway"]["drain_timeout"] == "5s"  # the file's own value
    assert doc["gateway"]["buffer_size"] == "64KiB"  # a default, as a file writes it
    assert doc["telemetry"]["metrics_interval"] == "10s"  # a section the file leaves out
    listener = doc["listener"][0]
    assert listener["backlog"] == 4096 and listener["peek_timeout"] == "1s"
    cluster = doc["cluster"]["api"]
    assert cluster["endpoints"][0] == "127.0.0.1:2"
    assert cluster["endpoints"][1] == {"address": "127.0.0.1:3", "weight": 2}
    assert cluster["health_check"] == {
        "interval": "2s",
        "timeout": "1s",
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
        "send": "",
        "expect": "",
    }
    assert "tproxy" not in doc  # off: its absence is the effective value
    assert doc["admin"]["bind"] == "127.0.0.1:9901"
    assert doc["admin"]["token_file"] == str(token)
    assert doc["admin"]["max_connections"] == 16
    rl = doc["plugin"]["ratelimit"]
    assert rl["redis_url"] == "redis://gw:<redacted>@127.0.0.1:6379/0"
    assert rl["per_client"] == {"rate": 5, "per": "1s", "burst": 0}
    assert rl["redis_timeout"] == "250ms" and rl["redis_url_file"] is None
    assert rl["bytes_per_second"] == 0


def test_format_duration() -> None:
    assert [format_duration(x) for x in (0, 0.25, 1, 90, 3600, 1e-5)] == [
        "0s",
        "250ms",
        "1s",
        "90s",
        "1h",
        "10us",
    ]
