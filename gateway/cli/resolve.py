"""``l4gw check --resolve``: resolve every name of a valid config once and print what each gave.

Plain ``l4gw check`` validates names without resolving them: a config must check
the same on a build machine as in production. ``--resolve`` asks the DNS servers
of ``[dns]`` (or the system's) exactly as a worker would (the same
:class:`~gateway.discovery.dns.Resolver`), for every name and SRV name in
``endpoints`` and in each ``endpoints_file``, all at once, and prints one line per
name per cluster: its addresses, or the failure. A file that cannot be read or
parsed is a failure too. The exit code is :data:`EXIT_UNRESOLVED` when anything
failed: a deployment script can refuse to roll out a config whose backends do not
resolve where it runs.
"""

from __future__ import annotations

import trio

from gateway.config import Config, Endpoint, NamedEndpoint, SrvEndpoint
from gateway.discovery import files
from gateway.discovery.dns import ResolveError, Resolver
from gateway.schema import Invalid

Spec = NamedEndpoint | SrvEndpoint

EXIT_UNRESOLVED = 1
"""``check --resolve``: a name, SRV name or endpoints file gave no endpoint."""


def check_resolve(config: Config) -> int:
    """Resolve every name of ``config`` once and print the result per name.

    Returns:
        0 when every name resolved, else :data:`EXIT_UNRESOLVED`.
    """
    wanted: list[tuple[str, Spec]] = []
    failed = 0
    for cname, cluster in config.clusters.items():
        wanted += [(cname, spec) for spec in cluster.names]
        if cluster.endpoints_file:
            try:
                with open(cluster.endpoints_file, "rb") as f:
                    _, names = files.parse(f.read(files.MAX_SIZE + 1))
            except OSError as exc:
                print(f"cluster {cname}: {cluster.endpoints_file}: FAILED: {exc.strerror}")
                failed += 1
                continue
            except Invalid as exc:
                print(f"cluster {cname}: {cluster.endpoints_file}: FAILED: {files.describe(exc)}")
                failed += 1
                continue
            wanted += [(cname, spec) for spec in names]
    resolver = Resolver(config.dns)
    results = trio.run(_resolve_all, resolver, list(dict.fromkeys(s for _, s in wanted)))
    servers = ", ".join(resolver.servers) or "none (the system resolver)"
    print(f"resolve: DNS servers: {servers}")
    for cname, spec in wanted:
        result = results[spec]
        if isinstance(result, ResolveError):
            failed += 1
            print(f"cluster {cname}: {_text(spec)}: FAILED ({result.kind}): {result}")
        else:
            found, ttl = result
            print(f"cluster {cname}: {_text(spec)} -> {_found(found)} (refresh in {ttl:g}s)")
    print(f"resolve: {len(wanted)} names, {failed} failed")
    return EXIT_UNRESOLVED if failed else 0


async def _resolve_all(
    resolver: Resolver, specs: list[Spec]
) -> dict[Spec, tuple[tuple[Endpoint, ...], float] | ResolveError]:
    results: dict[Spec, tuple[tuple[Endpoint, ...], float] | ResolveError] = {}

    await resolver.configure()

    async def one(spec: Spec) -> None:
        try:
            results[spec] = await resolver.endpoints(spec)
        except ResolveError as exc:
            results[spec] = exc

    async with trio.open_nursery() as nursery:
        for spec in specs:
            nursery.start_soon(one, spec)
    return results


def _text(spec: Spec) -> str:
    return f"SRV {spec.srv}" if isinstance(spec, SrvEndpoint) else f"{spec.name}:{spec.port}"


def _found(found: tuple[Endpoint, ...]) -> str:
    def one(e: Endpoint) -> str:
        if e.origin == "srv":
            return f"{e} (priority {e.priority}, weight {e.weight})"
        return str(e)

    return ", ".join(one(e) for e in found)
