"""l4gw: a pluggable L4 (TCP and UDP) gateway.

The public API for plugin authors is what ``__all__`` lists: the hook
markers, the values hooks receive and return, and the config-schema pieces a
plugin declares its ``[plugin.<name>]`` section with (:class:`Field` and the
converters of :mod:`gateway.schema`, whose ``__all__`` lists them), and
:func:`redact_url` / :func:`redact_text` for a plugin that shows a URL or a
config value. The hooks themselves are :mod:`gateway.hookspecs`.

Besides ``gateway`` and ``gateway.schema``:

* ``gateway.testing`` is public too: what a plugin's tests need (load plugins,
  a config from TOML text, a flow, the core's decisions, a real ``l4gw run``
  process and its pytest fixture).
* ``gateway.shield`` is public too: a plugin puts a client or prefix in the
  eBPF shield (the kernel drops its new connections) with a TTL and a reason,
  removes it, or looks a client up (its docstring is the API's documentation).
* ``gateway.discovery`` is public: a plugin publishes a cluster's endpoint set
  with it (``discovery.publish``), and reads the current sets.
* ``gateway.relay`` and ``gateway.telemetry`` are semi-public namespaces, as
  ``trio.lowlevel`` is: the modules their ``__all__`` lists, for plugins that
  take over the relay or the telemetry.

Everything else in the ``gateway`` package may change between releases.
tests/gateway/test_exports.py pins each of these ``__all__``.
"""

from __future__ import annotations

import pluggy

from gateway import schema
from gateway.config import ClusterConfig, Config, Endpoint, ListenerConfig, RouteConfig
from gateway.flow import CloseReason, Flow, Handover, Refusal, Route
from gateway.redact import redact_text, redact_url
from gateway.relay.copy import RelayReset, abort_on_close, both_directions
from gateway.relay.stats import RelayStats
from gateway.schema import Field, Invalid, Schema

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("l4gw")
"""Mark a hook implementation: ``@gateway.hookimpl`` or ``@gateway.hookimpl(tryfirst=True)``."""

__all__ = [
    "CloseReason",
    "ClusterConfig",
    "Config",
    "Endpoint",
    "Field",
    "Flow",
    "Handover",
    "Invalid",
    "ListenerConfig",
    "Refusal",
    "RelayReset",
    "RelayStats",
    "Route",
    "RouteConfig",
    "Schema",
    "__version__",
    "abort_on_close",
    "both_directions",
    "hookimpl",
    "redact_text",
    "redact_url",
    "schema",
]
