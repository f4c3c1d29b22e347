"""l4gw-geo-deny: refuse connections from listed client networks (``[plugin.geo_deny]``).

An example of a third-party l4gw plugin: it imports only the public API of
``gateway``, declares its config section with a schema (so ``l4gw check``
reports its mistakes with key paths), refuses in ``l4gw_admit`` (before any
byte of the connection is read) and adds attributes to the connection's
span. It is registered by the ``l4gw.plugins`` entry point in its own
pyproject.toml (``l4gw_geo_deny:plugin``); nothing in l4gw knows about it.

The plugin is an object, :class:`GeoDeny`, not a module of functions: its
state (the compiled rules) lives on the instance, so a test makes a fresh one
and nothing leaks from one test to the next. Its tests use only
``gateway.testing`` (``tests/``).

Lookups cost one set probe per distinct prefix length in the lists, so a
country-sized list of thousands of networks is as cheap as a short one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import Config, Field, Flow, Refusal, hookimpl, schema

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMA = {
    "deny": Field(schema.list_of(schema.network), (), "client networks to refuse"),
    "allow": Field(schema.list_of(schema.network), (), "exceptions to deny"),
    "reset": Field(schema.boolean, False, "refuse with RST instead of FIN"),
}


class NetworkSet:
    """Networks indexed by (version, prefix length) for a lookup per length."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._by_length: dict[tuple[int, int], dict[int, IPNetwork]] = {}
        for net in networks:
            key = (net.version, net.prefixlen)
            self._by_length.setdefault(key, {})[int(net.network_address)] = net
        # Most specific first, so a lookup names the narrowest match.
        self._lengths = sorted(self._by_length, key=lambda k: -k[1])

    def __bool__(self) -> bool:
        return bool(self._by_length)

    def match(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> IPNetwork | None:
        """The most specific listed network holding ``ip``, or None."""
        value, bits = int(ip), ip.max_prefixlen
        for version, length in self._lengths:
            if version != ip.version:
                continue
            mask = ((1 << length) - 1) << (bits - length) if length else 0
            net = self._by_length[(version, length)].get(value & mask)
            if net is not None:
                return net
        return None


@dataclass(frozen=True)
class Rules:
    """The compiled ``[plugin.geo_deny]`` section."""

    deny: NetworkSet
    allow: NetworkSet
    reset: bool

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> Rules:
        return cls(
            NetworkSet(section.get("deny", ())),
            NetworkSet(section.get("allow", ())),
            bool(section.get("reset", False)),
        )

    def denied_by(self, client_ip: str) -> IPNetwork | None:
        """The deny network that refuses ``client_ip``, or None to let it through."""
        ip = ipaddress.ip_address(client_ip)
        net = self.deny.match(ip)
        if net is None or self.allow.match(ip) is not None:
            return None
        return net


class GeoDeny:
    """The plugin: ``[plugin.geo_deny]`` compiled at every (re)configuration, checked
    in ``l4gw_admit``."""

    def __init__(self) -> None:
        self.rules = Rules(NetworkSet(()), NetworkSet(()), False)
        self.refused = 0
        """Connections refused since start: a plain counter tests can read."""

    @hookimpl
    def l4gw_config_sections(self) -> Mapping[str, Mapping[str, Field]]:
        return {"geo_deny": SCHEMA}

    @hookimpl
    def l4gw_configure(self, config: Config) -> frozenset[str] | None:
        # Called at start-up and on every reload (SIGHUP): swap in one assignment, so a
        # connection sees either the old rules or the new ones, never half of each.
        self.rules = Rules.from_section(config.plugin("geo_deny"))
        # Nothing to deny: the gateway need not call our admit at all (an idle hook).
        return None if self.rules.deny else frozenset({"l4gw_admit"})

    @hookimpl
    def l4gw_admit(self, flow: Flow) -> Refusal | None:
        rules = self.rules
        if not rules.deny:
            return None
        flow.set_attribute("geo_deny.checked", True)
        net = rules.denied_by(flow.client[0])
        if net is None:
            return None
        self.refused += 1
        flow.set_attribute("geo_deny.denied_by", str(net))
        return Refusal(
            f"client {flow.client[0]} is in {net}", rule=f"deny {net}", reset=rules.reset
        )


plugin = GeoDeny()
"""The instance the ``l4gw.plugins`` entry point names."""
