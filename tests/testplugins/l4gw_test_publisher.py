"""A test-only discovery plugin: publishes the endpoints a control file lists.

Installed by entry point as ``publisher`` (tests/e2e/test_discovery_plugin.py
writes its dist-info). It uses only the public API (``gateway``,
``gateway.discovery``), as a third-party plugin would::

    [plugin.publisher]
    cluster = "api"
    control = "/tmp/.../set.json"    # a JSON list of "ip:port", polled

    [cluster.api]
    discovery = "publisher"

Each time the control file's content changes, the whole set is published.
"""

from __future__ import annotations

import json

import trio

from gateway import Config, Endpoint, Field, discovery, hookimpl
from gateway import schema as s

NAME = "publisher"
POLL = 0.1

_section: dict[str, str] = {}


@hookimpl
def l4gw_config_sections() -> dict[str, dict[str, Field]]:
    return {NAME: {"cluster": Field(s.name), "control": Field(s.string)}}


@hookimpl
def l4gw_configure(config: Config) -> None:
    _section.clear()
    _section.update(config.plugin(NAME))


def _endpoints(text: str) -> list[Endpoint]:
    out = []
    for item in json.loads(text):
        host, _, port = item.rpartition(":")
        out.append(Endpoint(host.strip("[]"), int(port)))
    return out


async def _follow() -> None:
    last = None
    while True:
        try:
            text = await trio.Path(_section["control"]).read_text()
        except OSError:
            text = None
        if text is not None and text != last:
            last = text
            discovery.publish(_section["cluster"], _endpoints(text), source=NAME)
        await trio.sleep(POLL)


@hookimpl
def l4gw_startup(config: Config, nursery: trio.Nursery) -> None:
    if _section:
        nursery.start_soon(_follow)
