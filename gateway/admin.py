"""The admin HTTP endpoint (``[admin] bind``): health, readiness, metrics, live flows, config.

Paths (GET or HEAD):

* ``/healthz``: 200 while the process's loop answers.
* ``/readyz``: 200 once plugins started and every listener is open, 503
  before that and while draining (a load balancer stops sending); with
  ``[gateway] workers > 1``, only when every worker is.
* ``/metrics``: Prometheus text of the gateway's OpenTelemetry metrics, every
  worker's summed (gateway/telemetry/aggregate.py).
* ``/connections``: the live flows of every worker as JSON, with their byte
  counts as of now (and ``worker``, with several).
* ``/config``: the running configuration as JSON, every default filled in
  (gateway/effective.py), secrets redacted.
* ``/status``: what plugins report through ``l4gw_status`` (the relay
  tiers: enabled or why not, flows per tier, kernel-path bytes, ...), and
  under ``tproxy`` the TPROXY guard's last check (the owning gateway's worker 0),
  under ``reload`` this process's last reload (time, ``ok``, the error) and
  the reload counts by result,
  under ``shield`` the eBPF shield (kernel on or why off, entries, changes),
  under ``endpoints`` every cluster's endpoints with origin, source, weight,
  priority, health and when last updated (gateway/discovery).
* ``/shield``: the shield's entries; POST adds one, DELETE removes one
  (gateway/shield/admin.py; ``l4gw shield`` uses it).

Rules kept here:

* **Bounded and boring.** One request per connection (``Connection: close``),
  a request head of at most :data:`MAX_HEAD` bytes read within
  :data:`READ_TIMEOUT` (the whole head, so a slow client cannot stretch it),
  the answer sent within :data:`SEND_TIMEOUT`; anything else gets a 4xx and
  the socket closes. An admin client can never take the gateway down: every
  error of a request stays in that request's task.
* **Admin connections cannot starve the data plane.** At most ``[admin]
  max_connections`` are open at once; more are not accepted and wait in the
  kernel backlog, holding no file descriptor, task or buffer of the gateway
  (the listeners' ``on_max_connections = "wait"``). Accepting and closing
  them instead would make a probe fail at once whenever someone holds the
  slots; waiting, it is served as soon as one frees, which the timeouts
  above guarantee within seconds.
* **A token guards what is not a probe.** With ``[admin] token`` set, every
  path except ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer
  <token>`` (compared in constant time).
* **Nothing secret leaves.** ``/config`` is the running file with its
  defaults (:func:`gateway.effective.effective_config`) through
  :func:`gateway.redact.redact_config`: the admin token, every key named like
  a password, token, secret or key, and the credentials of every URL, found
  by parsing it, are masked.
* **The loop never blocks on it.** Building the Prometheus text runs in a
  worker thread, and so do the questions to the other workers (bounded:
  :data:`PEER_TIMEOUT`, :data:`PROBE_PEER_TIMEOUT`); the flow snapshot is
  taken without an await in between, so it is consistent.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from gateway import discovery, peers
from gateway.config import ADMIN_MAX_CONNECTIONS, Config, is_loopback
from gateway.effective import effective_config
from gateway.flow import Flow
from gateway.listeners import bind_error
from gateway.plugin_manager import Plugins
from gateway.reloads import Reloads
from gateway.schema import format_address
from gateway.shield import admin as shield_admin
from gateway.shield import table as shield_table
from gateway.telemetry import providers as telemetry
from gateway.tproxy import guard as tproxy_guard

log = logging.getLogger("l4gw.admin")

MAX_HEAD = 16384
READ_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
PROBES = frozenset({"/healthz", "/readyz"})
"""Paths open without the token (orchestrator probes carry no credentials)."""
PATHS = ("/healthz", "/readyz", "/metrics", "/connections", "/config", "/status", "/shield")
_ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_FULL_LOG_INTERVAL = 60.0
"""Seconds between two "admin connections at the cap" warnings."""


class GatewayView(Protocol):
    """What the endpoint reads of the gateway it serves (gateway/server.py's
    ``Gateway``, which starts it; declared here so that this module does not
    import the server)."""

    @property
    def config(self) -> Config:
        """The configuration in force (a reload replaces it)."""

    @property
    def plugins(self) -> Plugins: ...

    @property
    def flows(self) -> Mapping[int, Flow]:
        """The live flows of the process."""

    @property
    def listeners(self) -> Mapping[str, object]:
        """The listeners open in this process, by name."""

    @property
    def ready(self) -> bool:
        """Every listener open and the drain not begun."""

    @property
    def started_plugins(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    @property
    def reloads(self) -> Reloads:
        """The last reload's outcome and the counts (gateway/reloads.py)."""


# --- decisions on plain values (unit-tested) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    """Lower-case names."""


class BadRequest(ValueError):
    """The request head cannot be served (400)."""


def parse_head(head: bytes) -> Request:
    """Parse an HTTP/1.x request head (request line and headers, no body).

    Raises:
        BadRequest: malformed request line or header.
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest(str(exc))
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    method, target, _ = parts
    if not target.startswith("/"):
        raise BadRequest("target must be a path")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return Request(method, path, query, headers)


def authorized(request: Request, token: str) -> bool:
    """True when no token is configured, the path is a probe, or the bearer matches."""
    if not token or request.path in PROBES:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def flow_record(flow: Flow, now: float) -> dict[str, Any]:
    """One live flow as ``/connections`` shows it."""
    return {
        "id": flow.id,
        "listener": flow.listener,
        "transport": flow.transport,
        "client": format_address(*flow.client),
        "destination": format_address(*flow.destination),
        "sni": flow.sni,
        "route": flow.route,
        "cluster": flow.cluster,
        "endpoint": flow.endpoint,
        "bytes_from_client": flow.bytes_from_client,
        "bytes_to_client": flow.bytes_to_client,
        "age_seconds": round(max(0.0, now - flow.started), 3),
        "tier": flow.tier,
        "spliced": flow.spliced,
        "trace_id": flow.trace_id,
    }


def connections_document(flows: Iterable[Flow], now: float) -> dict[str, Any]:
    records = [flow_record(f, now) for f in flows]
    records.sort(key=lambda r: int(r["id"]))
    return {"count": len(records), "connections": records}


def readiness(gateway: GatewayView) -> tuple[bool, dict[str, Any]]:
    """Ready when plugins started, every configured listener is open and no drain began."""
    wanted = [li.name for li in gateway.config.listeners]
    missing = [name for name in wanted if name not in gateway.listeners]
    ready = bool(gateway.ready and gateway.started_plugins and not missing)
    return ready, {
        "ready": ready,
        "plugins_started": gateway.started_plugins,
        "listeners_open": sorted(gateway.listeners),
        "listeners_missing": missing,
        "draining": gateway.draining,
    }


# --- the server ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _json(status: int, document: Any) -> Response:
    body = json.dumps(document, indent=2, default=str).encode() + b"\n"
    return Response(status, body)


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


async def serve(
    gateway: GatewayView,
    bind: tuple[str, int] | None = None,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint of ``gateway`` until cancelled.

    ``task_status.started(port)`` once listening (the port, for ``bind`` port 0).

    Args:
        gateway: what the endpoint reports on.
        bind: the address to bind; default: ``[admin] bind`` of the config in force
            (a caller that records what it bound passes it, since a reload may
            change the config before this task runs).

    Raises:
        OSError: the address cannot be bound (the message names it).
    """
    admin = gateway.config.admin
    assert admin is not None
    host, port = bind if bind is not None else (admin.host, admin.port)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise bind_error(f"admin endpoint ({format_address(host, port)})", exc) from exc
    port = listeners[0].socket.getsockname()[1]
    log.info("admin endpoint on http://%s/", format_address(host, port))
    if not admin.token and not is_loopback(host):
        log.warning(
            "admin endpoint on %s serves /config, /connections and /metrics to the network "
            "without a token ([admin] insecure = true)",
            format_address(host, port),
        )
    task_status.started(port)

    def cap() -> int:
        # Read at each accept: a reload's new max_connections applies at once.
        current = gateway.config.admin
        return current.max_connections if current is not None else ADMIN_MAX_CONNECTIONS

    slots = Slots(cap)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _handle(gateway, stream)
        except Exception:
            log.exception("admin request failed")
        finally:
            try:
                await trio.aclose_forcefully(stream)
            finally:
                slots.release()

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, slots, handle)


class Slots:
    """The admin connections open now, and the wait for one to close at the cap.

    Args:
        cap: the cap in force (called at each acquire).
    """

    def __init__(self, cap: Callable[[], int]) -> None:
        self.cap = cap
        self.active = 0
        self._freed = trio.Event()
        self._last_full_log = -_FULL_LOG_INTERVAL

    async def acquire(self) -> None:
        """Take a slot, waiting while ``cap()`` are taken."""
        while self.active >= self.cap():
            now = time.monotonic()
            if now - self._last_full_log >= _FULL_LOG_INTERVAL:
                self._last_full_log = now
                log.warning(
                    "admin endpoint: %d connections open ([admin] max_connections); "
                    "new ones wait in the backlog",
                    self.active,
                )
            if self._freed.is_set():
                self._freed = trio.Event()
            await self._freed.wait()
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._freed.set()


async def _accept_loop(
    listener: trio.SocketListener,
    slots: Slots,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    """Accept while a slot is free; ``handle`` owns the stream and gives the slot back."""
    async with listener, trio.open_nursery() as handlers:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _ACCEPT_BACKOFF_ERRNOS:
                    raise
                # Out of descriptors or memory: the connection waits in the backlog.
                log.error("admin endpoint: accept failed (%s); retrying", exc.strerror)
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            handlers.start_soon(handle, stream)


async def _handle(gateway: GatewayView, stream: trio.SocketStream) -> None:
    head = b""
    response: Response | None = None
    request: Request | None = None
    with trio.move_on_after(READ_TIMEOUT) as scope:
        while b"\r\n\r\n" not in head:
            if len(head) > MAX_HEAD:
                response = _text(431, "request head too large\n")
                break
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        # A body (POST/DELETE /shield): at most MAX_HEAD bytes, within the same deadline.
        want = _body_length(head) if response is None else 0
        if want > MAX_HEAD:
            response = _text(400, "request body too large\n")
        while response is None and len(head) - head.index(b"\r\n\r\n") - 4 < want:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
    if scope.cancelled_caught:
        response = _text(408, "request timeout\n")
    if response is None:
        try:
            request = parse_head(head.split(b"\r\n\r\n", 1)[0])
        except BadRequest as exc:
            response = _text(400, f"{exc}\n")
    if response is None:
        assert request is not None
        response = await _respond(gateway, request, head.split(b"\r\n\r\n", 1)[1])
    with trio.move_on_after(SEND_TIMEOUT):
        await stream.send_all(
            _encode(response, head_only=request is not None and request.method == "HEAD")
        )


def _encode(response: Response, head_only: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


def _body_length(head: bytes) -> int:
    """The Content-Length of a complete request head (0 when absent or not a number)."""
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value) if value.strip().isdigit() else 0
    return 0


async def _respond(gateway: GatewayView, request: Request, body: bytes = b"") -> Response:
    shield_change = request.path == "/shield" and request.method in shield_admin.METHODS
    if request.method not in ("GET", "HEAD") and not shield_change:
        return Response(405, b"", "text/plain", (("Allow", "GET, HEAD"),))
    admin = gateway.config.admin
    if not authorized(request, admin.token if admin is not None else ""):
        return Response(
            401, b"bearer token required\n", "text/plain", (("WWW-Authenticate", "Bearer"),)
        )
    path = request.path
    if path == "/healthz":
        return _text(200, "ok\n")
    if path == "/readyz":
        ready, document = await every_worker_ready(gateway)
        return _json(200 if ready else 503, document)
    if path == "/metrics":
        return await _metrics()
    if path == "/connections":
        return _json(200, await every_worker_connections(gateway))
    if path == "/config":
        config = gateway.config
        document = effective_config(config, gateway.plugins.schemas())
        return _json(200, {"path": config.path, "config": document})
    if path == "/status":
        return _json(200, _status(gateway))
    if path == "/shield":
        return _shield(gateway, request, body)
    if path == "/":
        return _json(200, {"paths": [*PATHS]})
    return _text(404, "not found\n")


def _status(gateway: GatewayView) -> dict[str, Any]:
    """The plugins' ``l4gw_status`` reports, the TPROXY guard's under "tproxy", and
    the hooks each plugin declared idle under "idle_hooks"."""
    document = gateway.plugins.collect("l4gw_status")
    guard = tproxy_guard.current()
    if guard is not None:
        document["tproxy"] = guard.status()
    document["shield"] = shield_table.current().status()
    document["endpoints"] = discovery.registry.status()
    # The last reload of this process (SIGHUP, watch_config) and the counts by result.
    document["reload"] = gateway.reloads.status()
    # The per-connection hooks plugins declared idle (l4gw_configure): not called.
    document["idle_hooks"] = {name: sorted(h) for name, h in sorted(gateway.plugins.idle.items())}
    return document


def _shield(gateway: GatewayView, request: Request, body: bytes) -> Response:
    """``/shield`` (gateway/shield/admin.py): a change needs a token off loopback."""
    admin = gateway.config.admin
    may_change = admin is not None and (bool(admin.token) or is_loopback(admin.host))
    status, document = shield_admin.respond(
        shield_table.current(), request.method, request.query, body, may_change
    )
    return _json(status, document)


# --- every worker ([gateway] workers > 1: worker 0 asks the others, gateway/peers.py) ----------

PROBE_PEER_TIMEOUT = 0.5
"""Seconds ``/readyz`` waits for the other workers (orchestrator probes time out at 1 s)."""
PEER_TIMEOUT = 2.0
"""Seconds ``/connections`` waits for the other workers."""


async def every_worker_ready(gateway: GatewayView) -> tuple[bool, dict[str, Any]]:
    """:func:`readiness` of this process, and with several workers of every worker:
    ready only when each is (one that does not answer in time is not)."""
    ready, document = readiness(gateway)
    link = peers.current()
    if link is None or link.index != 0:
        return ready, document
    answers = await trio.to_thread.run_sync(link.query, "ready", PROBE_PEER_TIMEOUT)
    workers = [{"worker": 0, **document}]
    for index, answer in sorted(answers.items()):
        if answer is None:
            workers.append({"worker": index, "ready": False, "error": "no answer"})
        else:
            workers.append({"worker": index, **answer})
    ready = all(w.get("ready") is True for w in workers)
    return ready, {**document, "ready": ready, "workers": workers}


async def every_worker_connections(gateway: GatewayView) -> dict[str, Any]:
    """``/connections``: this process's flows, and with several workers every worker's,
    each with its ``worker``; ``workers_missing`` lists those that did not answer."""
    now = time.time()
    link = peers.current()
    document = connections_document(list(gateway.flows.values()), now)
    if link is None:
        return document
    records = [{**r, "worker": link.index} for r in document["connections"]]
    missing = []
    if link.index == 0:
        answers = await trio.to_thread.run_sync(link.query, "flows", PEER_TIMEOUT)
        for index, answer in sorted(answers.items()):
            if answer is None:
                missing.append(index)
            else:
                records.extend({**r, "worker": index} for r in answer["connections"])
    return {"count": len(records), "connections": records, "workers_missing": missing}


def peer_handlers(gateway: GatewayView) -> dict[str, Callable[[], Awaitable[Any]]]:
    """What a worker other than 0 answers worker 0 (:meth:`gateway.peers.Link.answer`)."""

    async def flows() -> Any:
        # Taken without an await in between: consistent, as this process's own.
        return connections_document(list(gateway.flows.values()), time.time())

    async def ready() -> Any:
        return readiness(gateway)[1]

    async def metrics() -> Any:
        current = telemetry.current()
        if current is None:
            return {"metrics": []}
        return await trio.to_thread.run_sync(current.worker_report)

    return {"flows": flows, "ready": ready, "metrics": metrics}


async def _metrics() -> Response:
    current = telemetry.current()
    if current is None or current.registry is None:
        return _text(503, "metrics unavailable: the telemetry plugin is not loaded\n")
    from prometheus_client import CONTENT_TYPE_LATEST

    body = await trio.to_thread.run_sync(current.prometheus_text)
    return Response(200, body, CONTENT_TYPE_LATEST)
