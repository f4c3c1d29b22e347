"""Endpoint discovery: the public API for plugins that publish a cluster's endpoints.

A semi-public namespace, as ``trio.lowlevel`` is: what ``__all__`` lists is the
API (pinned by tests/gateway/test_exports.py); the modules below it may change.

A cluster takes its endpoints from a plugin when the config says so::

    [cluster.api]
    discovery = "k8s"      # the plugin's name (its entry point's name)

and the plugin publishes the whole set whenever it changes, from a background
task started in ``l4gw_startup`` (docs/plugins.md shows a complete one)::

    from gateway import Endpoint, discovery

    discovery.publish("api", [Endpoint("10.1.2.3", 8080), Endpoint("10.1.2.4", 8080, 2)],
                      source="k8s")

New connections use a new set at once; connections open to an address that
left keep running; health-check state, outlier state and least-conn counts carry
over for the addresses that stay. The built-in sources (names and SRV names
followed in DNS, ``endpoints_file``) publish through the same call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateway.config import Endpoint
from gateway.discovery.registry import (
    DiscoveryError,
    EndpointSet,
    Registry,
    Subscriber,
    name_specs,
)

__all__ = [
    "DiscoveryError",
    "EndpointSet",
    "Registry",
    "endpoints",
    "name_specs",
    "publish",
    "registry",
    "subscribe",
]

registry = Registry()
"""This process's registry (each worker process has its own)."""


def publish(
    cluster: str, endpoints: Iterable[Endpoint], *, source: str, origin: str = "plugin"
) -> bool:
    """Replace the endpoints ``source`` gives ``cluster`` (:meth:`Registry.publish`).

    Call it from the trio thread (a task in the nursery ``l4gw_startup`` gives,
    or a hook); it never blocks.

    Args:
        cluster: the cluster's name; its config has ``discovery = "<source>"``.
        endpoints: the whole set (empty: none now); each an :class:`~gateway.Endpoint`
            (``weight`` and ``priority`` count; ``origin`` and ``source`` are set here).
        source: the publishing plugin's name.
        origin: leave it "plugin" (the built-in sources pass their own).

    Returns:
        True when the cluster uses the set now; False when no configured cluster
        names ``source`` (the set is kept for a reload that does; a warning is
        logged once).

    Raises:
        DiscoveryError: an item is not an Endpoint.
    """
    return registry.publish(cluster, endpoints, source=source, origin=origin)


def endpoints(cluster: str) -> tuple[Endpoint, ...]:
    """The current endpoint set of a configured cluster (empty when unknown)."""
    return registry.endpoints(cluster)


def subscribe(callback: Subscriber) -> Callable[[], None]:
    """Call ``callback(cluster, endpoints)`` after every change of a set; returns
    the function that unsubscribes (:meth:`Registry.subscribe`)."""
    return registry.subscribe(callback)
