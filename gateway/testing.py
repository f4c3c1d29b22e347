"""What a plugin's tests need, from the public API alone.

docs/plugins.md ("Testing a plugin") shows three layers; this module serves the
last two:

* **In process**: :func:`load_plugins` (the installed plugins, or the plugin
  objects a test gives), :func:`make_config` (a :class:`~gateway.Config` from
  TOML text, validated against the plugins' schemas), :func:`make_flow` (a
  :class:`~gateway.Flow` with plain defaults), :func:`run_decisions` (opened,
  admit, route and routed for that flow) and :func:`close_flow`.
* **End to end**: :class:`GatewayProcess`, a real ``l4gw run -c FILE`` process,
  and the ``gateway_process`` pytest fixture that starts them and stops every
  one when the test ends (``pytest_plugins = ["gateway.testing"]`` in the
  ``conftest.py`` at the top of your tests).

Rules kept here:

* **Nothing is re-implemented.** Plugins load through the core's loader (the
  same entry-point group and the same contract checks), a config is validated
  by the core's validator, and the decisions run through the core's decision
  stage (:mod:`gateway.decisions`: the same first-result driver, the same
  ``admit_on_error``/``route_on_error`` policies). What passes here passes in
  ``l4gw run``.
* **pytest stays optional.** This module imports without it; only the fixture
  needs it, and it exists when pytest is installed.
* **Whatever is started is stopped.** :meth:`GatewayProcess.stop` may be called
  any number of times; the fixture stops each process it started, whether the
  test passed or not.

Everything else in the ``gateway`` package (``gateway.config``,
``gateway.plugin_manager``, ...) may change between releases; import this
instead.

(PYTEST_DONT_REWRITE: pytest need not rewrite this module's asserts, it has
none; the marker spares a test that imports it before loading it as a plugin
a warning.)
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal as signals
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import trio

from gateway import config as config_mod
from gateway import plugin_manager, schema
from gateway.config import Config, ConfigError
from gateway.decisions import choose_route, refusal
from gateway.flow import CloseReason, Flow, Route
from gateway.plugin_manager import PluginError, Plugins
from gateway.relay.copy import CopyRelay
from gateway.runtime import Runtime, next_flow_id, record_close

__all__ = [
    "DEFAULT_LISTENER",
    "L4GW_COMMAND",
    "ConfigError",
    "Decision",
    "GatewayProcess",
    "PluginError",
    "Plugins",
    "close_flow",
    "load_plugins",
    "make_config",
    "make_flow",
    "run_decisions",
]

DEFAULT_LISTENER = "public"
"""The listener :func:`make_config` adds when the text has none, and :func:`make_flow`'s."""

L4GW_COMMAND = (sys.executable, "-m", "gateway.cli")
"""How :class:`GatewayProcess` starts ``l4gw``: the console command, run by this
interpreter so the gateway sees the plugins installed where the test runs."""


# --- in process -------------------------------------------------------------------------


def load_plugins(
    plugins: Mapping[str, object] | None = None,
    *,
    installed: bool | None = None,
    disabled: Iterable[str] = (),
) -> Plugins:
    """Load plugins the way ``l4gw run`` does.

    Args:
        plugins: ``{name: plugin}`` to register, each a module or an object with
            ``@hookimpl`` functions or methods (a fresh instance per test keeps
            tests apart). The name is the plugin's name (``flow.refused_by``).
        installed: load the installed plugins (the ``l4gw.plugins`` entry points)
            too; by default only when ``plugins`` is not given. A plugin given
            here replaces the installed one of the same name.
        disabled: installed plugins not to load, as ``[gateway] disable_plugins``.

    Returns:
        The loaded plugins, for :func:`make_config` and :func:`run_decisions`.

    Raises:
        PluginError: a plugin failed to load or does not fit the hook contract.
    """
    given = dict(plugins or {})
    if installed is None:
        installed = plugins is None
    return plugin_manager.load([*disabled, *given], given, installed=installed)


def make_config(
    text: str | Mapping[str, Any],
    plugins: Plugins | None = None,
    *,
    configure: bool = True,
    path: str = "test.toml",
) -> Config:
    """A validated configuration, as ``l4gw check`` and ``l4gw run`` validate it.

    When the text has no ``[[listener]]`` (one is required), a listener named
    :data:`DEFAULT_LISTENER` on ``127.0.0.1:0`` is added, so a test of a plugin
    section needs nothing else.

    Args:
        text: TOML text, or a document already parsed.
        plugins: whose ``[plugin.<name>]`` schemas apply (None: the core's
            sections only).
        configure: then call every plugin's ``l4gw_configure`` with it, as the
            gateway does before it starts (what each returns, the hooks it
            declares idle, is checked the same way; the helpers below still call
            every implementation, idle or not).
        path: the file name problems are reported with.

    Raises:
        ConfigError: the problems, each with its key path (``.problems``).
        PluginError: an ``l4gw_configure`` raised.
    """
    if isinstance(text, str):
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    else:
        raw = dict(text)
    if "listener" not in raw:
        raw["listener"] = [{"name": DEFAULT_LISTENER, "bind": "127.0.0.1:0"}]
    config = config_mod.from_dict(raw, path, plugins.schemas() if plugins is not None else {})
    if configure and plugins is not None:
        plugins.configure(config)
    return config


def make_flow(
    *,
    client: str | tuple[str, int] = ("198.18.0.1", 40000),
    destination: str | tuple[str, int] = ("198.18.0.2", 443),
    listener: str = DEFAULT_LISTENER,
    transport: str = "tcp",
    id: int | None = None,
    **fields: Any,
) -> Flow:
    """A new flow, as the core makes one when a connection is accepted.

    Args:
        client: the client's address: ``(ip, port)``, ``"ip:port"``,
            ``"[ip6]:port"`` or a bare IP (port 40000).
        destination: where the client connected to, written the same way (a
            bare IP gets port 443).
        listener: the name of the listener that accepted it.
        transport: ``"tcp"`` or ``"udp"``.
        id: the flow's id; by default the next one of the process, as the core
            numbers flows.
        **fields: any other attribute of :class:`~gateway.Flow` a stage would
            have set (``sni="api.example.com"``, ``alpn=("h2",)``, ...).

    Raises:
        TypeError: a field that a Flow does not have.
        ValueError: an address that is not one, or an unknown transport.
    """
    if transport not in ("tcp", "udp"):
        raise ValueError(f'transport: "tcp" or "udp", not {transport!r}')
    flow = Flow(
        next_flow_id() if id is None else id,
        listener,
        transport,
        _address(client, 40000),
        _address(destination, 443),
    )
    for name, value in fields.items():
        if name.startswith("_") or not hasattr(flow, name) or callable(getattr(flow, name)):
            raise TypeError(f"make_flow: a Flow has no field {name!r}")
        setattr(flow, name, tuple(value) if name == "alpn" else value)
    return flow


def _address(value: str | tuple[str, int], default_port: int) -> tuple[str, int]:
    if isinstance(value, tuple):
        host, port = value
        return str(ipaddress.ip_address(host)), int(port)
    try:
        return str(ipaddress.ip_address(value)), default_port
    except ValueError:
        pass
    try:
        return schema.address(value)
    except schema.Invalid as exc:
        raise ValueError(f"{value!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Decision:
    """What the core decided for a new flow (:func:`run_decisions`)."""

    close_reason: str | None
    """None when the flow was admitted, routed and not refused: the core would now
    connect to ``route.endpoints``. Else why it was closed, a
    :class:`~gateway.CloseReason`: ``refused``, ``no_route`` or ``plugin_error``."""
    route: Route | None
    """The route chosen; also set when ``l4gw_routed`` then refused the flow."""
    reset: bool
    """A refusal asked for a reset: the core closes the client with RST, not FIN."""
    refused_by: str | None
    """The plugin that refused the flow or raised (``"core"`` for ``no_route``)."""
    refused_rule: str | None
    """The refusal's ``rule``, when it named one."""
    error: str | None
    """The refusal's ``reason``, or the raising plugin's exception."""

    @property
    def ok(self) -> bool:
        """The flow passed every decision."""
        return self.close_reason is None


async def run_decisions(plugins: Plugins, config: Config, flow: Flow) -> Decision:
    """Take the decisions the core takes for a new flow, with the core's own code.

    ``l4gw_connection_opened``, then ``l4gw_admit``, ``l4gw_route`` and
    ``l4gw_routed``, each through the core's first-result driver (async
    implementations awaited) with ``config``'s failure policies (``[gateway]
    admit_on_error``, ``route_on_error``), leaving on ``flow`` what the core
    leaves (``route``, ``cluster``, ``refused_by``, ``refused_rule``, ``error``).
    A flow the decisions close is recorded as the core records a close:
    ``flow.ended`` set, ``l4gw_connection_closed`` called once, the close line
    logged (``l4gw.conn`` or ``l4gw.udp``). A flow that passes stays open: end it
    with :func:`close_flow`. The ClientHello is not peeked: set
    ``sni``/``alpn`` with :func:`make_flow`.

    Run it in trio: ``await`` it in a trio test, or
    ``trio.run(run_decisions, plugins, config, flow)``.
    """
    rt = _runtime(plugins, config)
    plugins.opened(flow)
    route: Route | None = None
    closed: tuple[str, bool] | None = await refusal(rt, flow, "l4gw_admit")
    if closed is None:
        chosen = await choose_route(rt, flow)
        if isinstance(chosen, str):
            closed = chosen, False
        else:
            route = chosen
            closed = await refusal(rt, flow, "l4gw_routed", route)
    if closed is not None:
        _close(rt, flow, closed[0])
    return Decision(
        close_reason=closed[0] if closed else None,
        route=route,
        reset=closed[1] if closed else False,
        refused_by=flow.refused_by,
        refused_rule=flow.refused_rule,
        error=flow.error,
    )


def close_flow(
    plugins: Plugins, config: Config, flow: Flow, reason: str = CloseReason.CLIENT_EOF
) -> None:
    """End a flow as the core records a close: ``flow.close_reason`` and
    ``flow.ended`` set, ``l4gw_connection_closed`` called for every plugin (one
    raising is logged; the others still run), the close line logged.

    Set the byte counts, ``endpoint`` or ``tier`` on the flow first when the
    observers should see them.

    Raises:
        ValueError: the flow was closed already (the core closes each once).
    """
    _close(_runtime(plugins, config), flow, reason)


def _runtime(plugins: Plugins, config: Config) -> Runtime:
    # The smallest copy buffer: the relay never runs here.
    return Runtime(config, plugins, CopyRelay(config_mod.BUFFER_MIN), {})


def _close(rt: Runtime, flow: Flow, reason: str) -> None:
    if flow.ended is not None:
        raise ValueError(f"flow {flow.id} is closed already ({flow.close_reason})")
    flow.close_reason = reason
    record_close(rt, flow)


# --- end to end -------------------------------------------------------------------------


class GatewayProcess:
    """One real ``l4gw run -c FILE`` process, started as users start it.

    The config is written to a file in ``workdir`` (a temporary directory when
    none is given, removed with the object or at the end of a ``with`` block),
    and the gateway's log (stdout and stderr) to ``<name>.log`` beside it::

        with GatewayProcess(CONFIG) as gw:          # started, and ready
            host, port = gw.address("public")        # bind port 0 is fine
            ...                                      # connect, send
            gw.wait_log(r"refused by=geo_deny")

    Args:
        config: the TOML text.
        workdir: where the config and log files go.
        name: the files' stem (``<name>.toml``, ``<name>.log``).
        env: environment variables added to this process's.
        prefix: a command the gateway runs under (``["prlimit", "--nofile=64"]``).
        command: how ``l4gw`` is started (default :data:`L4GW_COMMAND`).
    """

    def __init__(
        self,
        config: str,
        *,
        workdir: str | Path | None = None,
        name: str = "gw",
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        command: Sequence[str] | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="l4gw-test-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.config_path = self.workdir / f"{name}.toml"
        self.log_path = self.workdir / f"{name}.log"
        self.config_path.write_text(config)
        self.env = {**os.environ, **(env or {})}
        self.prefix = list(prefix)
        self.command = list(command or L4GW_COMMAND)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 15) -> GatewayProcess:
        """Start ``l4gw run``; with ``wait_ready``, return once its listeners are open.

        Raises:
            AssertionError: it exited, or was not ready within ``timeout`` seconds
                (the message holds its log).
        """
        if self.proc is not None:
            raise RuntimeError(f"{self.config_path.stem}: started already")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [*self.prefix, *self.command, "run", "-c", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        if wait_ready:
            # With workers, each logs its own "ready:"; the supervisor's line follows
            # the last of them (and worker 0's admin endpoint).
            workers = self._workers()
            self.wait_log(r"ready: " if workers == 1 else rf"all {workers} workers ready", timeout)
        return self

    def _workers(self) -> int:
        try:
            gateway = tomllib.loads(self.config_path.read_text()).get("gateway", {})
            workers = gateway.get("workers", 1) if isinstance(gateway, dict) else 1
        except (OSError, tomllib.TOMLDecodeError):
            return 1
        return workers if isinstance(workers, int) and workers > 1 else 1

    def write_config(self, config: str) -> None:
        """Replace the config file atomically, as a deploy should: a reload must
        never read half a file. (Then :meth:`reload`.)"""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config)
        os.replace(tmp, self.config_path)

    @property
    def log(self) -> str:
        """The gateway's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 10, count: int = 1) -> str:
        """Wait until ``pattern`` (a regex) occurs ``count`` times in the log.

        It blocks: in a trio test whose backends run in the test's own loop, use
        :meth:`await_log` (or ``trio.to_thread.run_sync``) so they are not starved.

        Returns:
            The log.

        Raises:
            AssertionError: the gateway exited, or the time ran out (the message
                holds the log).
        """
        deadline = time.monotonic() + timeout
        while not self._seen(pattern, count, deadline):
            time.sleep(0.02)
        return self.log

    async def await_log(self, pattern: str, timeout: float = 10, count: int = 1) -> str:
        """:meth:`wait_log` for trio code: other tasks run while it waits."""
        deadline = time.monotonic() + timeout
        # Polls a file another process writes: there is no event to wait on.
        while not self._seen(pattern, count, deadline):  # noqa: ASYNC110
            await trio.sleep(0.02)
        return self.log

    def _seen(self, pattern: str, count: int, deadline: float) -> bool:
        text = self.log
        if len(re.findall(pattern, text)) >= count:
            return True
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"gateway exited ({self.proc.returncode}) waiting for {pattern!r}; log:\n{text}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout waiting for {pattern!r}; log:\n{text}")
        return False

    def address(self, listener: str = DEFAULT_LISTENER) -> tuple[str, int]:
        """Where a listener listens, from the last ``ready:`` line of the log: with
        ``bind`` port 0, the port the kernel chose.

        Raises:
            LookupError: not ready yet, or no such listener.
        """
        lines = re.findall(r"ready: (.*)$", self.log, re.M)
        if not lines:
            raise LookupError(f"{self.config_path.stem}: not ready (no 'ready:' line in its log)")
        for item in lines[-1].split(", "):
            name, _, bound = item.partition("=")
            if name == listener:
                return schema.address(bound.strip())
        raise LookupError(f"no listener {listener!r} in: ready: {lines[-1]}")

    def reload(self, timeout: float = 10) -> bool:
        """SIGHUP, as an operator reloads, and wait for the outcome.

        Returns:
            True when the new config is in force ("reloaded"), False when the
            gateway kept the running one ("reload failed": the log says why).
        """
        outcome = r"reloaded |reload failed"
        before = len(re.findall(outcome, self.log))
        self.signal(signals.SIGHUP)
        text = self.wait_log(outcome, timeout, count=before + 1)
        found: list[str] = re.findall(outcome, text)
        return found[before].startswith("reloaded")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the gateway (SIGHUP reload, SIGUSR1 reopen, SIGTERM stop)."""
        if self.proc is None:
            raise RuntimeError(f"{self.config_path.stem}: not started")
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        """Wait for the gateway to exit; its exit code."""
        if self.proc is None:
            raise RuntimeError(f"{self.config_path.stem}: not started")
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM (drain, then exit), SIGKILL when it has not exited in ``timeout``
        seconds; the exit code (None when it was never started). Safe to repeat."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signals.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> GatewayProcess:
        return self if self.proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


if find_spec("pytest") is not None:
    import pytest

    @pytest.fixture
    def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
        """Start real ``l4gw run`` processes; each is stopped when the test ends.

        ``gateway_process(config, name="gw", wait_ready=True, timeout=15, **kw)``
        writes ``config`` to ``<tmp_path>/<name>.toml``, starts the gateway, waits
        until it is ready and returns its :class:`GatewayProcess`; ``kw`` are
        its ``env``, ``prefix`` and ``command``. Use it with
        ``pytest_plugins = ["gateway.testing"]`` in your top ``conftest.py``.
        """
        started: dict[str, GatewayProcess] = {}

        def start(
            config: str,
            name: str = "gw",
            wait_ready: bool = True,
            timeout: float = 15,
            **kw: Any,
        ) -> GatewayProcess:
            if name in started:
                raise ValueError(f"a gateway named {name!r} was started already: name another")
            gw = started[name] = GatewayProcess(config, workdir=tmp_path, name=name, **kw)
            return gw.start(wait_ready=wait_ready, timeout=timeout)

        yield start
        for gw in started.values():
            gw.stop()

    __all__ += ["gateway_process"]
