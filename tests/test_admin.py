"""gateway/admin.py: request parsing, the token, redaction, the flow records."""

from __future__ import annotations

import pytest

from gateway import Flow
from gateway.admin import (
    REDACTED,
    BadRequest,
    Request,
    authorized,
    connections_document,
    parse_head,
    redact,
)


def test_parse_head():
    r = parse_head(b"GET /connections?limit=5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n")
    assert (r.method, r.path, r.query) == ("GET", "/connections", "limit=5")
    assert r.headers == {"host": "x", "authorization": "Bearer t"}


@pytest.mark.parametrize(
    "head",
    [
        b"GET /\r\n",
        b"GET / HTTP/2\r\n",
        b"GET http://x/ HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n",
        b"GET / HTTP/1.1\r\n folded: header\r\n",
        b"",
    ],
)
def test_parse_head_rejects(head):
    with pytest.raises(BadRequest):
        parse_head(head)


def req(path: str, auth: str | None = None) -> Request:
    return Request("GET", path, "", {"authorization": auth} if auth else {})


def test_authorized():
    assert authorized(req("/metrics"), "")
    assert authorized(req("/healthz"), "s3cret")
    assert authorized(req("/readyz"), "s3cret")
    assert authorized(req("/metrics", "Bearer s3cret"), "s3cret")
    assert authorized(req("/metrics", "bearer s3cret"), "s3cret")
    assert not authorized(req("/metrics"), "s3cret")
    assert not authorized(req("/metrics", "Bearer wrong"), "s3cret")
    assert not authorized(req("/metrics", "Basic s3cret"), "s3cret")
    assert not authorized(req("/metrics", "Bearer s3cret-and-more"), "s3cret")


def test_redact():
    raw = {
        "admin": {"bind": "127.0.0.1:9901", "token": "t0p"},
        "plugin": {
            "ratelimit": {
                "redis_url": "redis://user:hunter2@127.0.0.1:6379/0",
                "fallback": ["rediss://:pw@[::1]:6380", "redis://127.0.0.1:6379"],
                "redis_password": "hunter2",
                "api_key": "k",
                "client_secret": "s",
                "per_client": 10,
                "empty_token": "",
            }
        },
        "cluster": {"api": {"endpoints": ["127.0.0.1:9001"]}},
    }
    out = redact(raw)
    assert out["admin"] == {"bind": "127.0.0.1:9901", "token": REDACTED}
    rl = out["plugin"]["ratelimit"]
    assert rl["redis_url"] == f"redis://user:{REDACTED}@127.0.0.1:6379/0"
    assert rl["fallback"] == [f"rediss://:{REDACTED}@[::1]:6380", "redis://127.0.0.1:6379"]
    assert rl["redis_password"] == rl["api_key"] == rl["client_secret"] == REDACTED
    assert rl["per_client"] == 10
    assert rl["empty_token"] == ""
    assert out["cluster"] == raw["cluster"]
    assert "hunter2" not in repr(out) and "t0p" not in repr(out)
    # The original is not touched.
    assert raw["admin"]["token"] == "t0p"


def test_connections_document():
    a = Flow(2, "public", "tcp", ("127.0.0.1", 5000), ("127.0.0.1", 8080))
    b = Flow(1, "v6", "tcp", ("::1", 5001), ("::1", 8443))
    a.route, a.cluster, a.endpoint, a.tier = "r", "c", "127.0.0.1:9001", "splice"
    a.bytes_from_client, a.bytes_to_client = 10, 20
    doc = connections_document([a, b], a.started + 1.5)
    assert doc["count"] == 2
    first, second = doc["connections"]
    assert first["id"] == 1 and first["client"] == "[::1]:5001"
    assert second["client"] == "127.0.0.1:5000"
    assert second["destination"] == "127.0.0.1:8080"
    assert (second["bytes_from_client"], second["bytes_to_client"]) == (10, 20)
    assert second["spliced"] is True and second["tier"] == "splice"
    assert second["age_seconds"] == 1.5
