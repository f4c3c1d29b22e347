"""l4gw's built-in plugins (import name ``l4gw_plugins``).

Each module is registered through the ``l4gw.plugins`` entry-point group in
l4gw's own pyproject.toml, the same path a third-party plugin takes, and uses
only the public API of the ``gateway`` package.
"""
