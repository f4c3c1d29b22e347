"""l4gw's built-in plugins (import name ``l4gw_plugins``).

Each module is registered through the ``l4gw.plugins`` entry-point group in
l4gw's own pyproject.toml, the same path a third-party plugin takes, and uses
only the public API: ``gateway`` (what its ``__all__`` lists) and the
semi-public namespaces ``gateway.relay`` and ``gateway.telemetry``. Each keeps
its state in an object (a fresh instance per test); the ``relay`` and
``telemetry`` plugins are thin hook adaptors over those namespaces.
"""
