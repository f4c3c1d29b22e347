"""The admin endpoint's ``/shield``: list, add and remove entries (``l4gw shield`` uses it).

* ``GET /shield``: ``{"kernel": {...}, "entries": [{"cidr", "reason", "source",
  "drops", "expires_in", "added"}, ...]}`` (``expires_in``: seconds, or null
  for an entry without expiry).
* ``POST /shield``: add. A JSON body ``{"cidr": "198.51.100.0/24", "ttl":
  "2m" or 120, "reason": "..."}`` or the same as query parameters. Without
  ``ttl`` the entry has no expiry (an operator's entry is static). 200 with
  ``{"added": entry}``; 409 with ``{"error": reason}`` when the shield
  refuses it (the never-list, ...); 400 for a bad CIDR or TTL.
* ``DELETE /shield?cidr=...`` (or a JSON body ``{"cidr": ...}``): 200 with
  ``{"removed": entry}``, 404 when nothing is listed exactly so.

Rules kept here:

* **Changes need the token off loopback.** The endpoint's own rule (a set
  ``[admin] token`` guards every path but the probes) applies; in addition
  a change is refused (403) on an endpoint bound to a non-loopback address
  without a token, even with ``[admin] insecure = true``: that setting opens
  reading, and an anonymous write to the kernel's drop list would let anyone
  on the network lock clients out.
* Entries added here have source ``admin`` and are logged and counted like
  every other (by worker 0, which serves the endpoint).
* Plain values in, plain values out: :func:`respond` returns a status and a
  JSON document; gateway/admin.py frames it.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from gateway.schema import parse_duration
from gateway.shield.table import Shield, ShieldRefused

METHODS = ("GET", "HEAD", "POST", "DELETE")
MAX_REASON = 200


class _BadInput(ValueError):
    pass


def respond(
    shield: Shield, method: str, query: str, body: bytes, may_change: bool
) -> tuple[int, dict[str, Any]]:
    """Answer one ``/shield`` request.

    Args:
        shield: the gateway's table.
        method: GET, HEAD, POST or DELETE.
        query: the query string (without "?").
        body: the request body (JSON or empty).
        may_change: False when a change must be refused (see the module rules).

    Returns:
        (HTTP status, JSON document).
    """
    if method in ("GET", "HEAD"):
        return 200, listing(shield)
    if not may_change:
        return 403, {
            "error": "changes to the shield need [admin] token on an admin endpoint "
            "that is not on loopback"
        }
    try:
        params = _params(query, body)
        cidr = _text(params, "cidr", required=True)
        if method == "DELETE":
            removed = shield.remove(cidr)
            if removed is None:
                return 404, {"error": f"{cidr} is not listed (give the CIDR as listed)"}
            return 200, {"removed": removed.document(shield.clock_ns())}
        ttl = _ttl(params.get("ttl"))
        reason = _text(params, "reason") or "added by an operator"
        entry = shield.add(cidr, ttl, reason[:MAX_REASON], source="admin", static=True)
        return 200, {"added": entry.document(shield.clock_ns())}
    except ShieldRefused as exc:
        return 409, {"error": exc.reason}
    except ValueError as exc:
        return 400, {"error": str(exc)}


def listing(shield: Shield) -> dict[str, Any]:
    now = shield.clock_ns()
    return {
        "kernel": shield.status()["kernel"],
        "entries": [e.document(now) for e in shield.entries()],
    }


def _params(query: str, body: bytes) -> dict[str, Any]:
    params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(query).items()}
    if body.strip():
        try:
            document = json.loads(body)
        except ValueError:
            raise _BadInput("the body is not JSON") from None
        if not isinstance(document, dict):
            raise _BadInput('the body must be a JSON object like {"cidr": "198.51.100.7"}')
        params.update(document)
    return params


def _text(params: dict[str, Any], key: str, required: bool = False) -> str:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise _BadInput(f"{key} is required")
        return ""
    if not isinstance(value, str):
        raise _BadInput(f"{key} must be a string")
    return value


def _ttl(value: Any) -> float | None:
    """Seconds from 120, "120" or "2m"; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _BadInput('ttl must be seconds or a duration like "2m"')
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value)
        try:
            seconds = float(text)
        except ValueError:
            seconds = parse_duration(text)
    if not seconds > 0:
        raise _BadInput(f"ttl must be above 0s (got {value})")
    return seconds
