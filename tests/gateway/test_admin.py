"""gateway/admin.py: request parsing, the token, the flow records, the connection cap.

Redaction of ``/config`` is tests/gateway/test_redact.py's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio
import trio.testing

from gateway import Flow
from gateway import config as config_mod
from gateway.admin import (
    BadRequest,
    Request,
    Slots,
    authorized,
    connections_document,
    parse_head,
    readiness,
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


def test_readiness_reads_what_it_needs_of_any_gateway():
    # Not gateway.server.Gateway: anything with the fields of admin.GatewayView.
    raw = {
        "listener": [{"name": "a", "bind": "127.0.0.1:1"}, {"name": "b", "bind": "127.0.0.1:2"}],
        "route": [{"listener": "a", "cluster": "c"}],
        "cluster": {"c": {"endpoints": ["127.0.0.1:3"]}},
    }
    gw = SimpleNamespace(
        config=config_mod.from_dict(raw, "<test>", {}),
        listeners={"a": object()},
        ready=True,
        started_plugins=True,
        draining=False,
    )
    ready, doc = readiness(gw)
    assert not ready and doc["listeners_missing"] == ["b"]
    gw.listeners["b"] = object()
    ready, doc = readiness(gw)
    assert ready and doc["listeners_open"] == ["a", "b"] and not doc["draining"]
    gw.ready, gw.draining = False, True
    assert readiness(gw)[0] is False


async def test_slots_wait_at_the_cap_and_follow_a_new_cap():
    cap = [2]
    slots = Slots(lambda: cap[0])
    await slots.acquire()
    await slots.acquire()
    got: list[int] = []

    async def third() -> None:
        await slots.acquire()
        got.append(slots.active)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and slots.active == 2  # waiting, not over the cap
            slots.release()
        assert got == [2]
        # A reload lowers the cap: nobody gets in until enough have left.
        cap[0] = 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            slots.release()
            await trio.testing.wait_all_tasks_blocked()
            assert got == [2]
            slots.release()
        assert got == [2, 1]
