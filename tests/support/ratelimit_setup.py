"""What the ratelimit plugin's tests set up: a validated section and a clock they move.

:func:`section` validates ``[plugin.ratelimit]`` text the way ``l4gw check``
does (against the plugin's schema, inside a minimal valid config), so a test
configures the plugin with exactly what the gateway would hand it. A
:class:`Clock` stands still until the test moves it.
"""

from __future__ import annotations

import tomllib
from typing import Any

from gateway.config import from_dict
from l4gw_plugins.ratelimit.plugin import SCHEMA

BASE = """
[[listener]]
name = "public"
bind = "127.0.0.1:1"

[[route]]
name = "main"
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:2"]
"""
"""A minimal valid config around the section (nothing listens on these ports)."""


def section(text: str) -> dict[str, Any]:
    """The ``[plugin.ratelimit]`` section made of ``text``, validated.

    Raises:
        ConfigError: ``text`` is not a valid section.
    """
    config = from_dict(
        tomllib.loads(BASE + "[plugin.ratelimit]\n" + text), "t", {"ratelimit": SCHEMA}
    )
    return dict(config.plugin("ratelimit"))


class Clock:
    """Monotonic seconds that move only when a test sets :attr:`now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
