"""UDP listeners: sessions through the connection hooks, replies from the original destination.

A session is (client address, original destination). Its first datagram
opens it and goes through the stages of a TCP connection (DESIGN.md):
opened, admit, route, routed, "connect" (a connected UDP socket per session,
bound to the client's IP and port with ``upstream_source = "client"``),
PROXY v2 header (prepended to every datagram), then the relay both ways
until the session idles out, its backend is unreachable, or the gateway
drains; then the closed hook, once. The stages are the TCP path's own code
(gateway/decisions.py: admit, route, routed, the connect loop, the PROXY
header; gateway/runtime.py: the close record); this module brings what is
UDP's: the session table, the datagrams, the reply sockets.

Longer than ~600 lines on purpose: the receive path, the session tasks and
the reply sockets all work on the listener's one receive buffer, its nursery
and its session table, under the rules below (a buffer valid from a ``recv``
to the next checkpoint); split over modules, each part would need all of them.

Rules kept here:

* **The per-datagram path is a dict lookup and a send.** Hooks run once per
  session, in the session's own task; later datagrams follow the session:
  no hook call, no log line, no allocation but what ``recv`` returns (the
  address, and the ancillary data that names the destination) and a view of
  the datagram.
* **Receive loops batch** (reference/conventions.md C.6): non-blocking
  ``recv`` until EAGAIN, yielding to the scheduler every
  :data:`BATCH` datagrams, and one clock reading per batch.
* **One receive buffer per listener.** It is valid from a ``recv`` to the
  ``send`` that follows it with no checkpoint in between (trio switches tasks
  only at checkpoints); whatever must wait (a queue, a full socket buffer)
  takes a copy first.
* **Each session is recorded exactly once**, in its task's ``finally``:
  counts, close reason, closed hook, log line. Refused sessions are recorded
  when refused and stay in the table as tombstones (gateway/udp/sessions.py).
* **Nothing goes upstream before admit, route and routed said yes**: the
  gateway never forwards to the original destination as such.
* **Replies leave from the address the client sent to**: from the listener
  socket for a plain listener (on a wildcard address, with IP_PKTINFO naming
  the source: the host's choice might be another of its addresses, which the
  client would reject); for a transparent one, from a transparent
  socket bound to the original destination, shared by that destination's
  sessions. Such a socket is also *read* like the listener: where a
  ``socket transparent`` rule sees the datagram before the TPROXY rule (the
  kernel documentation's own rule order), the kernel delivers the
  destination's next datagrams to it, not to the listener.
* **One task at a time waits for a socket to become writable** (trio
  raises otherwise): a send that finds a shared socket full waits holding
  that socket's lock.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable, wait_writable

from gateway.config import Endpoint, ListenerConfig
from gateway.decisions import Opener, choose_route, connect_upstream, proxy_header, refusal
from gateway.flow import CloseReason, Flow, unmap
from gateway.linux import IP_PKTINFO, IPV6_PKTINFO
from gateway.runtime import Runtime, next_flow_id, record_close
from gateway.schema import format_address
from gateway.udp.sessions import (
    MAX_DATAGRAM,
    DatagramQueue,
    SessionTable,
    UdpCounters,
    decode_sockaddr,
    pktinfo_destination,
)
from gateway.udp.sockets import open_reply_socket, open_upstream

log = logging.getLogger("l4gw.udp")

BATCH = 64
"""Datagrams handled per receive loop before yielding to other tasks."""
REFUSED_HOLD = 5.0
"""Longest time a refused session's tombstone drops its client's datagrams before
the next one is admitted and routed afresh."""
_ANCILLARY = socket.CMSG_SPACE(28)  # one sockaddr_in6, the larger of the two
_UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
_WARN_EVERY = 5.0

# Session states.
PENDING, OPEN, REFUSED = 0, 1, 2
# How a listener learns each datagram's destination: it is the listener's address
# (PLAIN), the original destination (ORIGDST, transparent), or one of the host's
# addresses (PKTINFO, a listener on 0.0.0.0 or [::]).
PLAIN, ORIGDST, PKTINFO = 0, 1, 2

UpstreamTuple = tuple[str, int, str, int]
"""(client ip, client port, endpoint ip, endpoint port) of a transparent upstream socket."""


class _ReplySocket:
    """A socket replies leave from, with the lock of its slow path."""

    __slots__ = ("key", "lock", "sock", "users")

    def __init__(self, sock: socket.socket, key: Any = None) -> None:
        self.sock = sock
        self.key = key
        self.users = 0
        self.lock = trio.Lock()


class UdpSession:
    """One session's state; the table and the receive path use its fields directly."""

    __slots__ = (
        "client",
        "cmsg",
        "dropped",
        "flow",
        "header",
        "key",
        "last",
        "queue",
        "reason",
        "reply",
        "scope",
        "state",
        "timeout",
        "tuple",
        "up",
    )

    def __init__(self, key: Any, flow: Flow, client: Any, now: float, timeout: float) -> None:
        self.key = key
        self.flow = flow
        self.client = client
        """The client's socket address as ``recvfrom`` gave it (replies go there)."""
        self.state = PENDING
        self.up: socket.socket | None = None
        self.reply: _ReplySocket | None = None
        self.cmsg: list[tuple[int, int, bytes]] | None = None
        """Ancillary data of each reply (IP_PKTINFO: its source address), if any."""
        self.queue: DatagramQueue | None = DatagramQueue()
        """Datagrams waiting to go upstream; None when nothing waits (the fast path)."""
        self.header: bytes | None = None
        """PROXY v2 header prepended to each datagram upstream."""
        self.last = now
        self.timeout = timeout
        self.scope = trio.CancelScope()
        self.reason: str | None = None
        self.dropped = 0
        self.tuple: UpstreamTuple | None = None


class UdpListener:
    """One UDP listener: its socket, its sessions, their tasks.

    Args:
        config: the listener's configuration (a reload may replace it: new
            sessions use the new one, open sessions keep their timeout).
        sock: from :func:`open_udp_socket`.
        runtime: the current runtime (config, plugins), read when a session opens.
        draining: whether the gateway is draining (the close reason of a
            cancelled session).
        session_ended: called after each recorded session (the drain waits on it).
        upstream_tuples: the 4-tuples of the process's transparent upstream sockets,
            shared by its UDP listeners. Two sessions of one client port (to two
            original destinations) routed to one endpoint would share a 4-tuple,
            and the backend's replies could reach either: the second one keeps
            the client's IP but not its port.
    """

    def __init__(
        self,
        config: ListenerConfig,
        sock: socket.socket,
        runtime: Callable[[], Runtime],
        draining: Callable[[], bool],
        session_ended: Callable[[], None] = lambda: None,
        upstream_tuples: set[UpstreamTuple] | None = None,
    ) -> None:
        self._config = config
        self._tuples: set[UpstreamTuple] = set() if upstream_tuples is None else upstream_tuples
        self.sock = sock
        self.runtime = runtime
        self.draining = draining
        self.session_ended = session_ended
        self.table: SessionTable[Any, UdpSession] = SessionTable(config.max_sessions)
        self.counters = UdpCounters()
        self.accepting = True
        self.scope = trio.CancelScope()
        if config.transparent:
            self.mode = ORIGDST
        elif ipaddress.ip_address(config.host).is_unspecified:
            self.mode = PKTINFO
        else:
            self.mode = PLAIN
        self._closing = False
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        self._listener_reply = _ReplySocket(sock)
        self._replies: dict[Any, _ReplySocket] = {}
        self._nursery: trio.Nursery | None = None
        self._timer = trio.CancelScope()
        self._last_warning = -math.inf
        self._local = unmap(sock.getsockname())
        """Destination of datagrams without an original destination: the listener's own."""

    # --- the listener's life ------------------------------------------------------------

    def identity(self) -> tuple[Any, ...]:
        """Listeners with the same identity keep their socket across a reload (the
        same shape as a TCP listener's, so the server compares them alike)."""
        c = self.config
        return (c.name, c.protocol, c.host, c.port, c.transparent, c.backlog)

    @property
    def config(self) -> ListenerConfig:
        return self._config

    @config.setter
    def config(self, config: ListenerConfig) -> None:
        """A reload kept this listener: new sessions follow ``config`` (open ones keep
        their timeout; a lower cap only stops new sessions)."""
        self._config = config
        self.table.cap = config.max_sessions

    def stop_accepting(self) -> None:
        """The drain: datagrams of open sessions still flow both ways, new sessions
        are no longer opened."""
        self.accepting = False

    def close(self) -> None:
        """Close the socket and end every session (close reason ``drain``) now: a
        reload removed the listener, and its sessions' datagrams came through (and, on
        a plain listener, their replies left from) this socket."""
        self._closing = True
        self.accepting = False
        notify_closing(self.sock)
        self.sock.close()
        self.scope.cancel()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or closed."""
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._expire)
                    nursery.start_soon(self._receive, self.sock)
                    task_status.started()
        finally:
            self._closing = True
            self.sock.close()
            for reply in list(self._replies.values()):
                reply.sock.close()
            self._replies.clear()
            log.info("udp listener %s closed: %s", self.config.name, self.counters.summary())

    # --- receiving ----------------------------------------------------------------------

    async def _receive(self, sock: socket.socket) -> None:
        """Read ``sock`` (the listener, or a reply socket) until it is closed."""
        buf = self._buf
        dispatch = self._dispatch
        plain = self.mode == PLAIN
        count = 0
        now = trio.current_time()
        while True:
            try:
                if plain:
                    n, addr = sock.recvfrom_into(buf)
                    key: Any = addr
                else:
                    n, ancdata, _, addr = sock.recvmsg_into((buf,), _ANCILLARY)
                    key = (addr, ancdata[0][2] if ancdata else None)
            except BlockingIOError:
                count = 0
                try:
                    await wait_readable(sock)
                except trio.ClosedResourceError:
                    return
                now = trio.current_time()
                continue
            except OSError as exc:
                if sock.fileno() == -1:
                    return
                self._warn(f"receive failed: {exc.strerror}")
                if exc.errno in (errno.ENOMEM, errno.ENOBUFS):
                    await trio.sleep(0.1)
                continue
            dispatch(n, key, addr, now)
            count += 1
            if count >= BATCH:
                count = 0
                await checkpoint()
                now = trio.current_time()

    def _dispatch(self, n: int, key: Any, addr: Any, now: float) -> None:
        """Forward one datagram (``n`` bytes in the receive buffer) of session ``key``."""
        session = self.table.sessions.get(key)
        if session is not None:
            up = session.up
            if up is not None and session.queue is None:
                session.last = now
                try:
                    if session.header is None:
                        up.send(self._view[:n])
                    else:
                        up.sendmsg((session.header, self._view[:n]))
                except BlockingIOError:
                    self._enqueue(session, n)
                    self._start_flush(session)
                except OSError as exc:
                    self._upstream_error(session, exc)
                else:
                    flow = session.flow
                    flow.bytes_from_client += n
                    flow.datagrams_from_client += 1
            elif session.state != REFUSED:
                session.last = now
                self._enqueue(session, n)
            else:
                self.counters.refused += 1
            return
        self._open(n, key, addr, now)

    def _open(self, n: int, key: Any, addr: Any, now: float) -> None:
        if not self.accepting:
            self.counters.refused += 1
            return
        lc = self.config
        table = self.table
        if len(table) >= table.cap:
            table.over_cap += 1
            self.counters.over_cap += 1
            self._warn(
                f"max_sessions={table.cap} reached: "
                f"{self.counters.over_cap} datagrams of new sessions dropped so far"
            )
            return
        destination = self._local
        if self.mode != PLAIN and key[1] is not None:
            try:
                if self.mode == ORIGDST:
                    destination = decode_sockaddr(key[1])
                else:
                    destination = (pktinfo_destination(key[1])[0], self._local[1])
            except ValueError:
                pass
        rt = self.runtime()
        flow = Flow(next_flow_id(), lc.name, "udp", unmap(addr), destination)
        session = UdpSession(key, flow, addr, now, lc.session_idle_timeout)
        assert session.queue is not None
        session.queue.push(bytes(self._view[:n]))
        table.add(key, session)
        self.counters.sessions += 1
        self._schedule(now + session.timeout)
        assert self._nursery is not None
        self._nursery.start_soon(self._session, session, rt)

    def _enqueue(self, session: UdpSession, n: int) -> None:
        queue = session.queue
        if queue is None:
            queue = session.queue = DatagramQueue()
        if not queue.push(bytes(self._view[:n])):
            self.counters.queue_full += 1
            session.dropped += 1

    def _upstream_error(self, session: UdpSession, exc: OSError) -> None:
        """A send upstream failed: an ICMP error ends the session, others drop the datagram."""
        if exc.errno in _UNREACHABLE:
            self._close(session, CloseReason.BACKEND_UNREACHABLE, os.strerror(exc.errno or 0))
        elif exc.errno == errno.EMSGSIZE:
            self.counters.oversized += 1
            session.dropped += 1
        else:
            self.counters.send_errors += 1
            session.dropped += 1

    def _start_flush(self, session: UdpSession) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._flush_task, session)

    async def _flush_task(self, session: UdpSession) -> None:
        try:
            await self._flush(session)
        except (trio.ClosedResourceError, OSError):
            pass  # the session closed meanwhile

    async def _flush(self, session: UdpSession) -> None:
        """Send what waits in the session's queue, in order; then the fast path resumes."""
        queue = session.queue
        up = session.up
        assert up is not None
        while queue:
            datagram = queue.peek()
            try:
                if session.header is None:
                    up.send(datagram)
                else:
                    up.sendmsg((session.header, datagram))
            except BlockingIOError:
                await wait_writable(up)
                continue
            except OSError as exc:
                if session.reason is not None:
                    return
                self._upstream_error(session, exc)
                if session.reason is not None:
                    return
            else:
                flow = session.flow
                flow.bytes_from_client += len(datagram)
                flow.datagrams_from_client += 1
            queue.pop()
        session.queue = None

    # --- one session --------------------------------------------------------------------

    async def _session(self, session: UdpSession, rt: Runtime) -> None:
        flow = session.flow
        rt.flows[flow.id] = flow
        reason: str | None = None
        try:
            with session.scope:
                reason = await self._serve(session, rt)
        except Exception as exc:
            # A session closed by another task meanwhile (its socket closed under a
            # pending wait) already has its reason; anything else is a bug.
            if session.reason is None:
                log.exception("udp session %d: internal error", flow.id)
                reason = CloseReason.INTERNAL_ERROR
                flow.error = repr(exc)
        finally:
            if session.reason is None:
                if reason is None:
                    # Cancelled: by the drain, or by closing the listener.
                    draining = self.draining() or self._closing
                    reason = CloseReason.DRAIN if draining else CloseReason.INTERNAL_ERROR
                session.reason = reason
            if session.state != REFUSED:
                self.table.remove(session.key, session)
            self._release(session)
            flow.close_reason = session.reason
            if session.dropped:
                flow.set_attribute("l4gw.udp.datagrams_dropped", session.dropped)
            del rt.flows[flow.id]
            record_close(rt, flow, session.dropped)
            self.session_ended()

    async def _serve(self, session: UdpSession, rt: Runtime) -> str | None:
        flow = session.flow
        plugins = rt.plugins
        if rt.opened_hook:
            plugins.opened(flow)

        if rt.admit_hook:
            refused = await refusal(rt, flow, "l4gw_admit")
            if refused:
                return self._tombstone(session, refused[0])

        route = await choose_route(rt, flow)
        if isinstance(route, str):
            return self._tombstone(session, route)
        cluster = route.cluster

        if rt.routed_hook:
            refused = await refusal(rt, flow, "l4gw_routed", route)
            if refused:
                return self._tombstone(session, refused[0])

        if cluster.proxy_protocol == "v1":
            flow.error = 'PROXY protocol v1 has no UDP form: use proxy_protocol = "v2"'
            return self._tombstone(session, CloseReason.CONNECT_FAILED)

        try:
            session.reply = self._reply_socket(session)
        except (OSError, ValueError) as exc:
            flow.error = f"reply socket for {format_address(*flow.destination)}: {exc}"
            return self._tombstone(session, CloseReason.INTERNAL_ERROR)

        source = flow.client if cluster.upstream_source == "client" else None
        up = await connect_upstream(rt, route, flow, self._opener(session), source)
        if isinstance(up, str):
            return self._tombstone(session, up)
        if cluster.proxy_protocol == "v2":
            session.header = proxy_header(cluster, flow)
        session.state = OPEN
        flow.tier = "copy"
        await self._flush(session)
        if session.reason is not None:
            return None  # the backend was unreachable already
        return await self._pump(session)

    def _tombstone(self, session: UdpSession, reason: str) -> str:
        """The session was refused: it stays in the table, dropping its datagrams,
        for at most :data:`REFUSED_HOLD` seconds."""
        session.state = REFUSED
        if session.queue is not None:
            session.dropped += len(session.queue)
            self.counters.refused += len(session.queue)
            session.queue = None
        if session.timeout > REFUSED_HOLD:
            session.timeout = REFUSED_HOLD
            if self.table.sessions.get(session.key) is session:
                self.table.reschedule(session.key, session)
                self._schedule(session.last + session.timeout)
        return reason

    def _opener(self, session: UdpSession) -> Opener:
        """The connect loop's attempt for ``session``: a connected UDP socket, at once
        (nothing to wait for), held by the session.

        With ``upstream_source = "client"`` the socket is bound to the client's IP and
        port, unless another session of that client port already holds the 4-tuple
        to this endpoint: then to the client's IP and a port the kernel chooses.
        """
        tuples = self._tuples
        flow = session.flow

        async def attempt(
            endpoint: Endpoint, timeout: float, source: tuple[str, int] | None
        ) -> socket.socket:
            bind = source
            if source is not None and (*source, endpoint.host, endpoint.port) in tuples:
                bind = (source[0], 0)
                flow.add_event("client_port_in_use", endpoint=str(endpoint))
            up = open_upstream(endpoint, bind)
            if source is not None:
                four = (source[0], up.getsockname()[1], endpoint.host, endpoint.port)
                tuples.add(four)
                session.tuple = four
            session.up = up
            return up

        return attempt

    async def _pump(self, session: UdpSession) -> str | None:
        """Backend to client until the session ends; the close reason, or None when
        someone else closed it (and set the reason)."""
        up = session.up
        reply = session.reply
        if up is None or reply is None:
            return None
        rsock = reply.sock
        cmsg = session.cmsg
        client = session.client
        flow = session.flow
        buf = self._buf
        view = self._view
        count = 0
        now = trio.current_time()
        while True:
            try:
                n = up.recv_into(buf)
            except BlockingIOError:
                count = 0
                try:
                    await wait_readable(up)
                except trio.ClosedResourceError:
                    return None
                now = trio.current_time()
                continue
            except OSError as exc:
                if session.reason is not None:
                    return None
                if exc.errno in _UNREACHABLE:
                    flow.error = os.strerror(exc.errno or 0)
                    return CloseReason.BACKEND_UNREACHABLE
                raise
            session.last = now
            try:
                if cmsg is None:
                    rsock.sendto(view[:n], client)
                else:
                    rsock.sendmsg((view[:n],), cmsg, 0, client)
            except BlockingIOError:
                if not await self._send_slow(reply, bytes(view[:n]), client, session):
                    continue
            except OSError as exc:
                self._reply_error(session, exc)
                continue
            flow.bytes_to_client += n
            flow.datagrams_to_client += 1
            count += 1
            if count >= BATCH:
                count = 0
                await checkpoint()
                now = trio.current_time()

    async def _send_slow(
        self, reply: _ReplySocket, datagram: bytes, client: Any, session: UdpSession
    ) -> bool:
        async with reply.lock:
            while True:
                try:
                    if session.cmsg is None:
                        reply.sock.sendto(datagram, client)
                    else:
                        reply.sock.sendmsg((datagram,), session.cmsg, 0, client)
                    return True
                except BlockingIOError:
                    await wait_writable(reply.sock)
                except OSError as exc:
                    self._reply_error(session, exc)
                    return False

    def _reply_error(self, session: UdpSession, exc: OSError) -> None:
        if exc.errno == errno.EMSGSIZE:
            self.counters.oversized += 1
        else:
            self.counters.send_errors += 1
        session.dropped += 1

    # --- reply sockets ------------------------------------------------------------------

    def _reply_socket(self, session: UdpSession) -> _ReplySocket:
        if self.mode == PLAIN:
            return self._listener_reply
        if self.mode == PKTINFO:
            raw = session.key[1]
            if raw is not None:
                info = pktinfo_destination(raw)[1]
                level, kind = (
                    (socket.IPPROTO_IP, IP_PKTINFO)
                    if len(info) == 12
                    else (socket.IPPROTO_IPV6, IPV6_PKTINFO)
                )
                session.cmsg = [(level, kind, info)]
            return self._listener_reply
        dst_key = session.key[1]
        reply = self._replies.get(dst_key)
        if reply is None:
            destination = session.flow.destination
            if destination == self._local or dst_key is None:
                # Sent to the listener's own address: it answers itself.
                return self._listener_reply
            reply = _ReplySocket(open_reply_socket(destination), dst_key)
            self._replies[dst_key] = reply
            assert self._nursery is not None
            self._nursery.start_soon(self._receive, reply.sock)
        reply.users += 1
        return reply

    def _release(self, session: UdpSession) -> None:
        """Give back what the session holds: its upstream socket and its reply socket."""
        self._drop_upstream(session)
        reply = session.reply
        session.reply = None
        if reply is None or reply is self._listener_reply:
            return
        reply.users -= 1
        if reply.users == 0 and self._replies.get(reply.key) is reply:
            del self._replies[reply.key]
            self._close_reply(reply)

    def _close_reply(self, reply: _ReplySocket) -> None:
        sock = reply.sock
        if not self._closing and self.accepting and not self.draining():
            # Datagrams the kernel already put here belong to other (new) sessions
            # of this destination: hand them on before the socket goes.
            now = trio.current_time()
            for _ in range(BATCH):
                try:
                    n, ancdata, _, addr = sock.recvmsg_into((self._buf,), _ANCILLARY)
                except OSError:
                    break
                self._dispatch(n, (addr, ancdata[0][2] if ancdata else None), addr, now)
        notify_closing(sock)
        sock.close()

    # --- ending sessions ----------------------------------------------------------------

    def _close(self, session: UdpSession, reason: str, error: str | None = None) -> None:
        """End ``session`` now (its task records it); the first reason given wins."""
        if session.reason is None:
            session.reason = reason
            if error:
                session.flow.error = error
        self.table.remove(session.key, session)
        # Closed here, not in the task's finally: the next session of this client
        # may bind the same (transparent) address before that task runs.
        self._drop_upstream(session)
        session.scope.cancel()

    def _drop_upstream(self, session: UdpSession) -> None:
        up = session.up
        if up is not None:
            session.up = None
            notify_closing(up)
            up.close()
        if session.tuple is not None:
            self._tuples.discard(session.tuple)
            session.tuple = None

    def _schedule(self, deadline: float) -> None:
        if deadline < self._timer.deadline:
            self._timer.deadline = deadline

    async def _expire(self) -> None:
        table = self.table
        while True:
            with trio.CancelScope() as timer:
                self._timer = timer
                for _, session in table.expired(trio.current_time()):
                    if session.state != REFUSED:
                        self._close(session, CloseReason.SESSION_IDLE)
                deadline = table.next_deadline()
                timer.deadline = math.inf if deadline is None else deadline
                await trio.sleep_forever()

    def _warn(self, text: str) -> None:
        now = trio.current_time()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            log.warning("udp listener %s: %s", self.config.name, text)
