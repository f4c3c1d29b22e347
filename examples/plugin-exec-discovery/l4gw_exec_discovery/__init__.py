"""l4gw-exec-discovery: a cluster's endpoints from a command's output (``[plugin.exec_discovery]``).

An example of a third-party discovery plugin. It imports only the public API
(``gateway`` and ``gateway.discovery``), runs its work in a background task
started from ``l4gw_startup`` (in every worker process: each publishes to its
own registry), and publishes each cluster's whole endpoint set with
``discovery.publish`` whenever it changes. l4gw does the rest: new connections
use the new set at once, open ones keep running, health and least-conn state
carry over for addresses that stay, and the change is logged and counted.

Rules it keeps (as every discovery plugin should):

* **Never block the event loop**: the command runs as a subprocess
  (``trio.run_process``), bounded by ``timeout``.
* **A failure keeps the last good set**: nothing is published when a command
  fails or prints something else; one warning per outage, one line when it ends.
* **Publish whole sets**, and only when they differ (l4gw ignores a repeat, but
  there is no reason to ask).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import trio

from gateway import Config, Endpoint, Field, discovery, hookimpl, schema

NAME = "exec_discovery"
"""The plugin's name: its entry point's, which clusters name in ``discovery``."""

log = logging.getLogger("l4gw_exec_discovery")

COMMAND = {
    "cluster": Field(schema.name, doc='the cluster (its config says discovery = "exec_discovery")'),
    "command": Field(schema.list_of(schema.string, min_items=1), doc="argv of the command"),
}

SCHEMA = {
    "interval": Field(schema.positive_duration, 10.0, "how often each command runs"),
    "timeout": Field(schema.positive_duration, 5.0, "a command slower than this fails"),
    "commands": Field(schema.list_of(schema.table(COMMAND)), (), "one per cluster"),
}


class ParseError(ValueError):
    """The command's output is not a list of endpoints."""


def parse(output: bytes) -> tuple[Endpoint, ...]:
    """The endpoints a command printed: a JSON list of ``"ip:port"`` or
    ``{"address": "ip:port", "weight": N, "priority": N}``.

    Raises:
        ParseError: naming the item at fault.
    """
    try:
        items = json.loads(output)
    except ValueError as exc:
        raise ParseError(f"not JSON: {exc}") from None
    if not isinstance(items, list):
        raise ParseError("expected a JSON list")
    out = []
    for i, item in enumerate(items):
        table: Mapping[str, Any] = item if isinstance(item, dict) else {"address": item}
        try:
            host, port = schema.address(table.get("address"))
        except schema.Invalid as exc:
            raise ParseError(f"[{i}]: {exc}") from None
        weight, priority = table.get("weight", 1), table.get("priority", 0)
        if not (isinstance(weight, int) and weight >= 0 and isinstance(priority, int)):
            raise ParseError(f"[{i}]: weight and priority must be integers (weight >= 0)")
        out.append(Endpoint(host, port, weight, priority))
    return tuple(out)


class ExecDiscovery:
    """The plugin: its settings swap in on each (re)load; one task runs the commands."""

    def __init__(self) -> None:
        self.interval = 10.0
        self.timeout = 5.0
        self.commands: tuple[tuple[str, tuple[str, ...]], ...] = ()
        self.failing: set[str] = set()
        self.last: dict[str, tuple[Endpoint, ...]] = {}

    @hookimpl
    def l4gw_config_sections(self) -> dict[str, dict[str, Field]]:
        return {NAME: SCHEMA}

    @hookimpl
    def l4gw_configure(self, config: Config) -> None:
        section = config.plugin(NAME)
        self.interval = section["interval"]
        self.timeout = section["timeout"]
        self.commands = tuple((c["cluster"], tuple(c["command"])) for c in section["commands"])

    @hookimpl
    def l4gw_startup(self, config: Config, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.run)

    async def run(self) -> None:
        """Run every command, then wait ``interval``; forever (cancelled at shutdown)."""
        while True:
            for cluster, command in self.commands:
                await self.refresh(cluster, command)
            await trio.sleep(self.interval)

    async def refresh(self, cluster: str, command: tuple[str, ...]) -> None:
        """Run one command and publish what it printed, when that changed."""
        try:
            with trio.fail_after(self.timeout):
                done = await trio.run_process(command, capture_stdout=True, check=False)
            if done.returncode != 0:
                raise ParseError(f"exit status {done.returncode}")
            endpoints = parse(done.stdout)
        except (OSError, ParseError, trio.TooSlowError) as exc:
            why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            if cluster not in self.failing:
                self.failing.add(cluster)
                log.warning(
                    "cluster %s: %s: %s; keeping the last good set", cluster, command[0], why
                )
            return
        if cluster in self.failing:
            self.failing.discard(cluster)
            log.info("cluster %s: %s works again", cluster, command[0])
        if self.last.get(cluster) != endpoints:
            self.last[cluster] = endpoints
            discovery.publish(cluster, endpoints, source=NAME)


plugin = ExecDiscovery()
"""The instance the ``exec_discovery`` entry point registers."""
