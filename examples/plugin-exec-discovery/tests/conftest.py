"""The ``gateway_process`` fixture (a real ``l4gw run``) comes from l4gw's public
testing module, loaded as a pytest plugin."""

pytest_plugins = ["gateway.testing"]
