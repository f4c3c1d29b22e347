"""``/shield`` on the admin endpoint: list, add, remove, the token rule, the request body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import ip_network
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from gateway import admin
from gateway.shield import table
from gateway.shield.admin import respond
from gateway.shield.never import NeverList
from gateway.testing import make_config

from shieldtable import installed


@pytest.fixture
def shield() -> Iterator[table.Shield]:
    never = NeverList.build(trusted=[("lb", ip_network("198.18.9.0/24"))])
    with installed(table.Shield(None, off_reason="no [shield] section", never=never)) as fresh:
        yield fresh


def test_add_list_delete(shield: table.Shield) -> None:
    body = json.dumps({"cidr": "192.0.2.0/24", "ttl": "2m", "reason": "scanner"}).encode()
    status, doc = respond(shield, "POST", "", body, True)
    assert status == 200
    assert doc["added"]["cidr"] == "192.0.2.0/24" and doc["added"]["source"] == "admin"
    assert 119 < doc["added"]["expires_in"] <= 120
    status, doc = respond(shield, "POST", "cidr=192.0.2.9&ttl=30&reason=one", b"", True)
    assert status == 200 and doc["added"]["expires_in"] <= 30
    status, doc = respond(shield, "POST", "cidr=203.0.113.1", b"", True)
    assert status == 200 and doc["added"]["expires_in"] is None  # an operator's: no expiry
    assert doc["added"]["reason"] == "added by an operator"
    status, doc = respond(shield, "GET", "", b"", False)
    assert status == 200
    assert doc["kernel"] == {
        "enabled": False,
        "why_off": "no [shield] section",
        "enforced_by": "l4gw_admit (acl, ratelimit plugins)",
    }
    assert [e["cidr"] for e in doc["entries"]] == ["203.0.113.1/32", "192.0.2.9/32", "192.0.2.0/24"]
    status, doc = respond(shield, "DELETE", "cidr=192.0.2.9", b"", True)
    assert status == 200 and doc["removed"]["cidr"] == "192.0.2.9/32"
    status, doc = respond(shield, "DELETE", "", b'{"cidr": "192.0.2.9"}', True)
    assert status == 404 and "not listed" in doc["error"]


@pytest.mark.parametrize(
    "query,body,status,error",
    [
        ("cidr=198.18.9.7&ttl=1m", b"", 409, "proxy_protocol_trusted of listener lb"),
        ("cidr=127.0.0.1", b"", 409, "loopback"),
        ("cidr=nonsense", b"", 400, 'not an address or CIDR: "nonsense"'),
        ("cidr=192.0.2.1&ttl=soon", b"", 400, "not a duration"),
        ("cidr=192.0.2.1&ttl=0", b"", 400, "ttl must be above 0s"),
        ("", b"", 400, "cidr is required"),
        ("", b"[1]", 400, "must be a JSON object"),
        ("", b"{", 400, "not JSON"),
    ],
)
def test_bad_adds(shield: table.Shield, query: str, body: bytes, status: int, error: str) -> None:
    got, doc = respond(shield, "POST", query, body, True)
    assert (got, error in doc["error"]) == (status, True), doc
    assert shield.entries() == []


def test_changes_refused_without_may_change(shield: table.Shield) -> None:
    status, doc = respond(shield, "POST", "cidr=192.0.2.1", b"", False)
    assert status == 403 and "[admin] token" in doc["error"]
    assert shield.entries() == []


async def http(port: int, request: bytes, pause_after: int = 0) -> tuple[int, Any]:
    """Send ``request`` (in two parts, split at ``pause_after``); the status and JSON body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        if pause_after:
            await stream.send_all(request[:pause_after])
            await trio.sleep(0.05)
        await stream.send_all(request[pause_after:])
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    is_json = b"application/json" in head
    return int(head.split()[1]), json.loads(body) if is_json else body.decode()


@pytest.mark.parametrize("token", ["", "s3cret"])
async def test_through_the_endpoint(shield: table.Shield, token: str) -> None:
    config = make_config(f'[admin]\nbind = "127.0.0.1:0"\ntoken = "{token}"\n')
    view = SimpleNamespace(config=config)  # /status: tests/e2e/test_shield_e2e.py
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    body = b'{"cidr": "192.0.2.0/24", "ttl": 60, "reason": "split body"}'
    post = (
        f"POST /shield HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    async with trio.open_nursery() as nursery:
        port = await nursery.start(admin.serve, view)
        status, doc = await http(port, post, pause_after=len(post) - 10)
        assert status == 200, doc
        assert doc["added"]["reason"] == "split body"
        status, doc = await http(port, f"GET /shield HTTP/1.1\r\n{auth}\r\n".encode())
        assert status == 200 and doc["entries"][0]["cidr"] == "192.0.2.0/24"
        if token:
            status, _ = await http(port, b"DELETE /shield?cidr=192.0.2.0/24 HTTP/1.1\r\n\r\n")
            assert status == 401
        status, doc = await http(
            port, f"DELETE /shield?cidr=192.0.2.0/24 HTTP/1.1\r\n{auth}\r\n".encode()
        )
        assert status == 200 and doc["removed"]["cidr"] == "192.0.2.0/24"
        status, _ = await http(port, f"PUT /shield HTTP/1.1\r\n{auth}\r\n".encode())
        assert status == 405
        status, _ = await http(port, f"POST /status HTTP/1.1\r\n{auth}\r\n".encode())
        assert status == 405
        nursery.cancel_scope.cancel()


def test_may_change_needs_a_token_off_loopback(shield: table.Shield) -> None:
    request = admin.Request("POST", "/shield", "cidr=192.0.2.1", {})
    for bind, token, expected in (
        ("127.0.0.1:9901", "", 200),
        ("0.0.0.0:9901", "", 403),
        ("0.0.0.0:9901", "t", 200),
    ):
        extra = "insecure = true\n" if not token else ""
        config = make_config(f'[admin]\nbind = "{bind}"\ntoken = "{token}"\n{extra}')
        response = admin._shield(SimpleNamespace(config=config), request, b"")  # type: ignore[arg-type]
        assert response.status == expected, (bind, token, response.body)
        shield.remove("192.0.2.1")
