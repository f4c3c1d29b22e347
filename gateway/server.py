"""The gateway process: listeners, connections, signals, reload and drain.

Task tree (every task has an owner):

    root ─ signal loop
         └ background (plugins' tasks from l4gw_startup; the admin endpoint and
             │         the TPROXY guard, in worker 0)
             └ connections (a task per connection, kept for the next one when
                 │             its connection ends: gateway/taskpool.py; each UDP
                 │             listener, whose sessions live in its own nursery)
                 └ accepting (one accept loop per listener, each in its own
                              cancel scope so a reload can close one)

Shutdown (SIGTERM/SIGINT) cancels ``accepting`` (listeners close, the kernel
refuses new connections), waits up to ``drain_timeout`` for ``connections``
to finish, cancels what is left (close reason "drain"), calls
``l4gw_shutdown`` and cancels the background tasks. UDP listeners stop
opening sessions at the drain but keep their socket until it ends: open
sessions still get their replies.
"""

from __future__ import annotations

import functools
import gc
import logging
import signal
import socket
from collections.abc import Callable
from typing import Any

import trio

from gateway import admin, configwatch, discovery, logformat, peers, sdnotify
from gateway import config as config_mod
from gateway.config import Config, ConfigError
from gateway.connection import handle, refuse_over_capacity
from gateway.flow import Flow
from gateway.identity import resolve_identity
from gateway.listeners import Listener, open_socket
from gateway.plugin_manager import Plugins
from gateway.process import drop_privileges, needed_capabilities
from gateway.relay import copy as copy_relay
from gateway.relay import poller as relay_poller
from gateway.relay.copy import CopyRelay
from gateway.reloads import Reloads
from gateway.runloop import fast_instrument_checks, run_spawn, start_soon
from gateway.runtime import Runtime
from gateway.schema import format_address
from gateway.shield import table as shield_table
from gateway.taskpool import TaskPool
from gateway.telemetry import providers
from gateway.tproxy.guard import Guard
from gateway.udp.listener import UdpListener, UpstreamTuple
from gateway.udp.sockets import open_udp_socket
from gateway.workers import HELD_WHILE_STARTING

log = logging.getLogger("l4gw")

_CONNECTION_TASK = f"{handle.__module__}.{handle.__qualname__}"
"""Each connection's task name, as trio would make it: given, trio does not format it
again for every connection (an f-string and two attribute reads per spawn)."""


class Gateway:
    """One gateway process serving ``config`` with ``plugins``."""

    def __init__(self, config: Config, plugins: Plugins, worker: int = 0) -> None:
        self.worker = worker
        """Index of this process among ``[gateway] workers`` (0 serves UDP and admin)."""
        self.flows: dict[int, Flow] = {}
        self.runtime = Runtime(config, plugins, CopyRelay(config.gateway.buffer_size), self.flows)
        self.listeners: dict[str, Listener | UdpListener] = {}
        self._upstream_tuples: set[UpstreamTuple] = set()
        """The 4-tuples of the transparent UDP upstream sockets, shared by the UDP
        listeners (gateway/udp/listener.py: ``upstream_tuples``)."""
        self.ready = False
        self.started = False
        """Became ready once (a failure before that is a failed start)."""
        self.draining = False
        self.started_plugins = False
        self.on_reload: list[Callable[[Config], None]] = []
        self.reloads = Reloads(sdnotify.current())
        self.on_reload.append(logformat.follow)
        """The last reload's outcome and the counts (``/status``, ``l4gw.reloads``)."""
        self._reload_when_ready = False
        """A SIGHUP came before the listeners were open: reload once they are."""
        self._stop = trio.Event()
        self._idle = trio.Event()
        self._accepting: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._tasks = TaskPool(handle, None, _CONNECTION_TASK, start_soon)
        """Serves each connection in a task of ``_connections`` (made when it opens)."""
        self._background: trio.Nursery | None = None
        self._admin: tuple[trio.CancelScope, trio.Event] | None = None
        """The admin endpoint's scope, and the event set once it has closed."""
        self._admin_bound: tuple[str, int] | None = None
        self._admin_moving = trio.Lock()
        """Two quick reloads move the endpoint one after the other, never both at once."""

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def plugins(self) -> Plugins:
        return self.runtime.plugins

    def stop(self) -> None:
        """Begin the drain (what SIGTERM does)."""
        self._stop.set()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped; ``task_status.started()`` once every listener is open."""
        fast_instrument_checks()
        config = self.config
        shield_table.current().configure(config, self.worker)  # before acl applies its list
        discovery.registry.configure(config)
        rt = self.runtime
        self.runtime = Runtime(config, rt.plugins.configure(config), rt.copy, rt.flows, rt.budget)
        self.reloads.instrument(providers.current())
        async with trio.open_nursery() as root:
            root.start_soon(self._signal_loop)
            link = peers.current()
            if link is not None and link.index > 0:  # worker 0 asks for every worker
                root.start_soon(link.answer, admin.peer_handlers(self))
            async with trio.open_nursery() as background:
                self._background = background
                # Names resolved and files read before plugins start health checks.
                await discovery.registry.start(background)
                for _, result in self.plugins.call_all(
                    "l4gw_startup", config=config, nursery=background
                ):
                    if result is not None:
                        await result
                self.started_plugins = True
                if config.admin is not None and self.worker == 0:
                    self._admin = await background.start(self._serve_admin)
                    self._admin_bound = _admin_bind(config)
                if self.worker == 0:
                    await self._start_tproxy_guard(background)
                    background.start_soon(shield_table.current().sweeper)
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    self._tasks = TaskPool(handle, connections, _CONNECTION_TASK, run_spawn())
                    async with trio.open_nursery() as accepting:
                        self._accepting = accepting
                        # The copy relay's epoll set, made now rather than with the first
                        # copied flow: a process's descriptors stay what they are at start.
                        relay_poller.current()
                        if not copy_relay.COMPILED:
                            log.info("copy relay: %s", copy_relay.loop_report())
                        for lc in self._mine(config):
                            self._open(lc)
                        if config.gateway.user:
                            # Listeners, TPROXY state and BPF objects are set up.
                            drop_privileges(
                                resolve_identity(config.gateway.user, config.gateway.group),
                                needed_capabilities(config),
                            )
                        self.ready = self.started = True
                        if self._reload_when_ready:
                            self.reload()
                        log.info(
                            "ready: %s",
                            ", ".join(f"{li.name}={self._bound(li)}" for li in config.listeners),
                        )
                        task_status.started()
                        self._notify_ready(background)
                        await self._stop.wait()
                        sdnotify.current().stopping()
                        self.ready = False
                        accepting.cancel_scope.cancel()
                        for listener in self.listeners.values():
                            if isinstance(listener, UdpListener):
                                listener.stop_accepting()
                    await self._drain(connections)
                self.plugins.observe("l4gw_shutdown", config=self.config)
                background.cancel_scope.cancel()
                discovery.registry.stop()
            root.cancel_scope.cancel()
        log.info("stopped")

    async def _drain(self, connections: trio.Nursery) -> None:
        timeout = self.config.gateway.drain_timeout
        if self.flows:
            log.info("draining %d connections (up to %gs)", len(self.flows), timeout)
            with trio.move_on_after(timeout):
                while self.flows:
                    self._idle = trio.Event()
                    await self._idle.wait()
        if self.flows:
            log.warning("drain timeout: closing %d connections", len(self.flows))
        self.draining = True
        connections.cancel_scope.cancel()

    def _mine(self, config: Config) -> list[config_mod.ListenerConfig]:
        """The listeners this process opens: UDP sessions live in one worker,
        since the session table is per process."""
        return [lc for lc in config.listeners if self.worker == 0 or lc.protocol == "tcp"]

    def _open(self, lc: config_mod.ListenerConfig) -> None:
        assert self._accepting is not None
        if lc.protocol == "udp":
            assert self._connections is not None
            udp = UdpListener(
                lc,
                open_udp_socket(lc),
                self._current_runtime,
                self._is_draining,
                self._released,
                self._upstream_tuples,
            )
            self.listeners[lc.name] = udp
            # In ``connections``, not ``accepting``: the drain keeps it serving open sessions.
            self._connections.start_soon(udp.run)
            return
        listener = Listener(lc, open_socket(lc, reuse_port=self.config.gateway.workers > 1))
        listener.ended = functools.partial(self._connection_ended, listener)
        self.listeners[lc.name] = listener
        self._accepting.start_soon(listener.accept_loop, self._spawn, self._refuse)

    def _refuse(self, listener: Listener, conn: socket.socket, peer: Any) -> None:
        refuse_over_capacity(self.runtime, listener.config, conn, peer)

    def _bound(self, lc: config_mod.ListenerConfig) -> str:
        """Where ``lc`` listens: with ``bind`` port 0, the port the kernel chose."""
        listener = self.listeners.get(lc.name)
        if listener is None:  # another worker's (UDP)
            return lc.bind
        return format_address(lc.host, listener.sock.getsockname()[1])

    def _spawn(self, listener: Listener, conn: socket.socket, peer: Any) -> None:
        self._tasks.start(
            (
                self.runtime,
                listener.config,
                conn,
                peer,
                self._is_draining,
                listener.local,
                listener.ended,
            )
        )

    def _connection_ended(self, listener: Listener) -> None:
        listener.released()
        if not self.flows:
            self._idle.set()

    def _is_draining(self) -> bool:
        return self.draining

    def _current_runtime(self) -> Runtime:
        return self.runtime

    def _released(self) -> None:
        if not self.flows:
            self._idle.set()

    async def _signal_loop(self) -> None:
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with trio.open_signal_receiver(*signals) as received:
            # A worker holds these while it starts (workers.py); from here they are ours.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_WHILE_STARTING)
            async for signum in received:
                if signum == signal.SIGHUP:
                    self.reload()
                elif signum == signal.SIGUSR1:
                    self.plugins.observe("l4gw_reopen")
                elif self._stop.is_set():
                    log.warning("second stop signal: closing everything now")
                    self.draining = True
                    if self._connections is not None:
                        self._connections.cancel_scope.cancel()
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    self.stop()

    def reload(self) -> bool:
        """Re-read the config file; on any problem keep the running config.

        Returns:
            True when the new configuration is in force (False also when it is
            deferred: before the listeners are open, the reload waits for them).
        """
        if self._accepting is None:
            self._reload_when_ready = True
            return False
        self._reload_when_ready = False
        try:
            return self._reload()
        finally:
            # A reload leaves reference cycles (the netlink messages of the shield's read
            # of the local addresses: about 1,100 objects, 18 KB). Under tune_gc's
            # thresholds they outlived the young collections: 400 reloads of an idle
            # gateway grew it by 7.4 MB, and by 48 KB with this collection of the young
            # generations (0.2 ms, where the reload itself takes 3-4 ms).
            gc.collect(1)

    def _reload(self) -> bool:
        self.reloads.begin()
        old = self.config
        try:
            names = [i.name for i in self.plugins.infos]
            new = config_mod.load(old.path, self.plugins.schemas(), names)
        except ConfigError as exc:
            log.error("reload failed; the running config stays:\n%s", exc.report())
            self.reloads.failed(exc.report())
            return False
        try:
            shield_table.current().configure(new, self.worker)
            discovery.registry.configure(new)
            plugins = self.plugins.configure(new)
        except Exception as exc:  # a plugin's, or the shield's or discovery's (OSError)
            log.error("reload failed; the running config stays: %s", exc)
            shield_table.current().configure(old, self.worker)
            discovery.registry.configure(old)
            # The running hook table stays (the same config declares the same idle hooks).
            self.plugins.configure(old)
            self.reloads.failed(str(exc))
            return False
        copy = self.runtime.copy
        if new.gateway.buffer_size != old.gateway.buffer_size:
            copy = CopyRelay(new.gateway.buffer_size)
        self.runtime = Runtime(new, plugins, copy, self.flows, self.runtime.budget)
        self._update_listeners(new)
        if self.worker == 0 and _admin_bind(new) != self._admin_bound:
            assert self._background is not None
            self._background.start_soon(self._rebind_admin)
        for callback in self.on_reload:
            callback(new)
        log.info("reloaded %s", new.path)
        for note in new.notes:
            log.info("%s: %s", new.path, note)
        self.reloads.succeeded(f"reloaded {new.path}")
        return True

    def _notify_ready(self, background: trio.Nursery) -> None:
        """Listeners open: tell systemd (or the supervisor); a single process also
        pings systemd's watchdog and watches its config file (with workers, the
        supervisor does both: gateway/sdnotify.py, gateway/configwatch.py)."""
        notifier = sdnotify.current()
        notifier.ready(f"serving {len(self.listeners)} listeners")
        if self.config.gateway.workers == 1:
            background.start_soon(sdnotify.watchdog, notifier)
            background.start_soon(configwatch.run, self._current_config)

    def _current_config(self) -> Config:
        return self.config

    async def _start_tproxy_guard(self, nursery: trio.Nursery) -> None:
        """``[tproxy] manage = true``: the owner's guard restores removed or changed rules
        (gateway/tproxy/guard.py; worker 0 runs it, and applies a reloaded ``[tproxy]``)."""
        guard = Guard.for_process(self.config)
        if guard is not None:
            self.on_reload.append(guard.follow)
            await nursery.start(guard.run)

    async def _serve_admin(
        self,
        bind: tuple[str, int] | None = None,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The admin endpoint on ``bind`` (default: the config in force), in a scope of
        its own (a reload that moves it cancels that scope); ``started`` with the scope
        and an event set once its socket is closed."""
        closed = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(admin.serve, self, bind)
                    task_status.started((scope, closed))
        finally:
            closed.set()

    async def _rebind_admin(self) -> None:
        """Move the admin endpoint to the reloaded ``[admin] bind`` (or close it).

        The new address is bound before the old one closes, so a port change has
        no gap. When that fails because the old socket holds the address (same
        port, another host), the old one closes first; when the new address
        cannot be bound at all, the endpoint stays off and an error says why.
        """
        async with self._admin_moving:
            background, old, want = self._background, self._admin, _admin_bind(self.config)
            if background is None or want == self._admin_bound:
                return  # a later reload already moved it here
            self._admin, self._admin_bound = None, None
            if want is None:
                if old is not None:
                    old[0].cancel()
                    await old[1].wait()
                    log.info("admin endpoint closed")
                return
            # Bind exactly ``want``: a reload during the await below may change the
            # config, and what is recorded as bound must be what is.
            try:
                self._admin = await background.start(self._serve_admin, want)
            except OSError as first:
                if old is None:
                    log.error("reload: %s", first)
                    return
                old[0].cancel()
                await old[1].wait()
                old = None
                try:
                    self._admin = await background.start(self._serve_admin, want)
                except OSError as exc:
                    log.error("reload: %s; the admin endpoint is off until the next reload", exc)
                    return
            self._admin_bound = want
            if old is not None:
                old[0].cancel()

    def _update_listeners(self, new: Config) -> None:
        wanted = {lc.name: lc for lc in self._mine(new)}
        for name, listener in list(self.listeners.items()):
            lc = wanted.get(name)
            keep = lc is not None and Listener(lc, listener.sock).identity() == listener.identity()
            if keep and lc is not None:
                listener.config = lc
                del wanted[name]
            else:
                listener.close()
                del self.listeners[name]
                log.info("listener %s closed", name)
        for lc in wanted.values():
            try:
                self._open(lc)
                log.info("listener %s opened on %s", lc.name, self._bound(lc))
            except OSError as exc:
                log.error("%s", exc)


def _admin_bind(config: Config) -> tuple[str, int] | None:
    return None if config.admin is None else (config.admin.host, config.admin.port)
