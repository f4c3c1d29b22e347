"""Requests to a running gateway's admin endpoint (``[admin] bind``) on loopback.

Plain ``http.client``, one connection a request, bounded by a timeout: the
answers the tests check are the status code and the body as the gateway wrote
them. The async forms run the request in a thread, so a trio test keeps serving
its backends meanwhile.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import trio

TIMEOUT = 10.0
"""Seconds for one request."""


def get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    """``GET path`` (with ``Authorization: Bearer token`` when given): status and body.

    Raises:
        OSError, http.client.HTTPException: the endpoint did not answer.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def aget(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    """:func:`get` from a trio task."""
    return await trio.to_thread.run_sync(get, port, path, token)


def get_json(port: int, path: str, token: str | None = None) -> dict[str, Any]:
    """The JSON document at ``path``; the answer must be 200."""
    status, body = get(port, path, token)
    assert status == 200, (status, body)
    document: dict[str, Any] = json.loads(body)
    return document
