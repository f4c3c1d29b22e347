"""Loading plugins and calling hooks the way the contract promises.

pluggy is synchronous and its ``firstresult`` stops at the first non-None
value, which for an ``async def`` implementation is a coroutine object even
when it means "abstain". So decision hooks go through :meth:`Plugins.decide`,
which walks the implementations in pluggy's order and awaits what is
awaitable; observers go through :meth:`Plugins.observe`, which isolates each
plugin's errors. The implementation lists are resolved once at load time:
per connection there is no pluggy dispatch, only a loop over a tuple. The
core gives a hook's arguments by position, in its spec's order, and each
implementation gets the ones it names by where they are: a keyword dict per
hook call cost 4 % of a new connection's instructions (bench/README.md).
Arguments by name are taken too (a plugin's tests call so).

Rules kept here:

* **Every hook call goes through a driver of this module**, never through
  ``pm.hook``: so pluggy's hook wrappers (``wrapper=True``, ``hookwrapper=True``)
  would never wrap anything. They are refused at load (:class:`PluginError`
  naming the plugin and the hook) rather than half-supported: a wrapper runs
  synchronously around the call, while decision hooks may be ``async def``,
  so it would see a coroutine, never the decision it meant to wrap. An
  ordinary implementation with ``tryfirst=True`` is the supported way to run
  before the others.
* **Only the hooks in :data:`AWAITED` are awaited.** An ``async def``
  implementation of any other hook (an observer, ``l4gw_configure``, ...)
  would never run (its coroutine dropped with a RuntimeWarning), so it is
  refused at load as well.
* **A per-connection hook a plugin declared idle is not called** for connections
  that start under that configuration (:meth:`Plugins.configure`: what its
  ``l4gw_configure`` returned). The tables are per configuration, and a flow keeps
  the one it started with to its close, so a plugin's opened/closed or
  connect/closed accounting never sees half of a flow.
* **A sampled flow's span is current during its hooks**, from the
  implementation of ``l4gw_connection_opened`` that set it (the telemetry
  plugin's runs first) to the last of ``l4gw_connection_closed``: attached once
  by :meth:`Plugins.opened`, detached once by :meth:`Plugins.closed`, never per
  hook (gateway/telemetry/context.py).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from gateway import hookspecs
from gateway.flow import Refusal, Route
from gateway.schema import Schema

if TYPE_CHECKING:
    from gateway.flow import Flow

log = logging.getLogger("l4gw.plugins")

ENTRY_POINT_GROUP = "l4gw.plugins"

AWAITED = frozenset({"l4gw_admit", "l4gw_route", "l4gw_routed", "l4gw_startup", "l4gw_relay"})
"""Hooks whose result the core awaits when it is awaitable: the decisions (by
:meth:`Plugins.decide`), ``l4gw_startup`` (before the listeners open) and
``l4gw_relay`` (whose awaitable is the relay itself). Every other hook is called
synchronously and must not be ``async def``."""


PER_CONNECTION = frozenset(
    {
        "l4gw_connection_opened",
        "l4gw_admit",
        "l4gw_route",
        "l4gw_routed",
        "l4gw_connect_attempt",
        "l4gw_relay",
        "l4gw_connection_closed",
    }
)
"""The hooks called for every connection or UDP session: those an implementation of
``l4gw_configure`` may declare idle (hookspecs.py)."""


class PluginError(Exception):
    """A plugin failed where the gateway cannot go on (loading, start-up)."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What ``l4gw plugins`` shows for one loaded plugin."""

    name: str
    module: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    prefix: int | None
    """It takes the first ``prefix`` arguments of its hook's spec, in the spec's order
    (most do, all of them): called ``f(*args[:prefix])``; else None."""
    order: tuple[int, ...]
    """Where each of its arguments is among the spec's (``prefix`` None: another
    order, or a subset with gaps)."""

    def call(self, args: tuple[Any, ...]) -> Any:
        """Call it with the arguments it names, from a hook call's ``args`` (all of the
        spec's, in the spec's order: no keyword dict per call, which cost a
        four-argument call three times a positional one)."""
        n = self.prefix
        if n is not None:
            return self.function(*args[:n])  # all of them: the tuple itself, no copy
        # map, not a list comprehension: that is one more Python call per hook call.
        return self.function(*map(args.__getitem__, self.order))


def _impl(
    plugin: str, function: Callable[..., Any], argnames: tuple[str, ...], spec: tuple[str, ...]
) -> _Impl:
    if not set(argnames) <= set(spec):
        # A hook without a spec here (``optionalhook``: one of a later l4gw): never called.
        return _Impl(plugin, function, argnames, None, ())
    order = tuple(spec.index(name) for name in argnames)
    prefix = len(order) if order == tuple(range(len(order))) else None
    return _Impl(plugin, function, argnames, prefix, order)


_PLAIN_RESULTS: frozenset[type] = frozenset({Refusal, Route})
"""Decision results known not to be awaitable: no ``inspect.isawaitable`` (an ABC
check) for them, per hook call."""


class Raised(Exception):
    """A decision hook raised; ``plugin`` names the culprit."""

    def __init__(self, plugin: str, error: BaseException) -> None:
        super().__init__(f"{plugin}: {error!r}")
        self.plugin = plugin
        self.error = error


class Plugins:
    """The loaded plugins and fast hook drivers."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        infos: list[PluginInfo],
        *,
        _loaded: Plugins | None = None,
        _idle: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self.pm = pm
        self.infos = infos
        self.idle: Mapping[str, frozenset[str]] = _idle or {}
        """``{plugin: hooks}`` it declared idle under the configuration this table
        is for (:meth:`configure`); empty for the table of every implementation."""
        if _loaded is None:
            self._loaded = self
            self._impls: dict[str, tuple[_Impl, ...]] = {}
            self._specs: dict[str, tuple[str, ...]] = {}
            for name in dir(pm.hook):
                if name.startswith("l4gw_"):
                    caller = getattr(pm.hook, name)
                    spec = tuple(caller.spec.argnames) if caller.spec else ()
                    self._specs[name] = spec
                    self._impls[name] = tuple(
                        _impl(i.plugin_name, i.function, tuple(i.argnames), spec)
                        for i in reversed(caller.get_hookimpls())
                    )
        else:
            self._loaded = _loaded
            self._specs = _loaded._specs
            self._impls = {
                hook: tuple(i for i in impls if hook not in self.idle.get(i.plugin, ()))
                for hook, impls in _loaded._impls.items()
            }

    def implements(self, hook: str) -> bool:
        return bool(self._impls.get(hook))

    def configure(self, config: Any) -> Plugins:
        """Call every ``l4gw_configure`` (each plugin's, whichever table this is) and
        return the hook table for connections that start under ``config``: without
        the per-connection hooks each plugin declared idle.

        Raises:
            PluginError: a plugin raised, naming it; or it returned something
                that is not a collection of names from :data:`PER_CONNECTION`.
        """
        idle: dict[str, frozenset[str]] = {}
        for impl in self._loaded._impls["l4gw_configure"]:
            try:
                result = impl.call((config,))
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin}: l4gw_configure: {exc!r}") from exc
            if result is not None:
                hooks = _idle_hooks(impl.plugin, result)
                if hooks:
                    idle[impl.plugin] = hooks
        if not idle:
            return self._loaded
        return Plugins(self.pm, self.infos, _loaded=self._loaded, _idle=idle)

    def schemas(self) -> dict[str, Schema]:
        """Config sections declared by every plugin."""
        out: dict[str, Schema] = {}
        for impl in self._impls["l4gw_config_sections"]:
            try:
                sections = impl.function()
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin}: l4gw_config_sections: {exc!r}")
            for section, fields in (sections or {}).items():
                if section in out:
                    raise PluginError(f"plugin {impl.plugin}: section {section} declared twice")
                out[section] = fields
        return out

    def _by_name(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """A hook call's arguments given by name, in its spec's order."""
        spec = self._specs[hook]
        if args or set(kwargs) != set(spec):
            raise TypeError(
                f"{hook}: give all of ({', '.join(spec)}), by position or by name; "
                f"got {len(args)} by position and {sorted(kwargs)}"
            )
        return tuple(kwargs[name] for name in spec)

    def call_all(self, hook: str, *args: Any, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation; let errors propagate wrapped in PluginError."""
        if kwargs:
            args = self._by_name(hook, args, kwargs)
        results = []
        for impl in self._impls[hook]:
            try:
                results.append((impl.plugin, impl.call(args)))
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin}: {hook}: {exc!r}") from exc
        return results

    async def decide(
        self, hook: str, fail_open: bool, *args: Any, **kwargs: Any
    ) -> tuple[str, Any] | None:
        """Drive a decision hook (``l4gw_admit``, ``l4gw_route``, ``l4gw_routed``)
        applying its failure policy.

        The implementations are called in pluggy's order (last registered first,
        ``tryfirst``/``trylast`` adjusting); a result that is awaitable (an
        ``async def`` implementation, or one returning an awaitable) is awaited
        before it is looked at, so an async "abstain" (None) goes on to the next
        plugin like a synchronous one. The first non-None result wins.

        Args:
            hook: the hook's name.
            fail_open: the policy for a raising plugin: True logs it and asks the
                next one (``admit_on_error``/``route_on_error = "open"``), False
                logs it and raises :class:`Raised` (the core refuses the flow).
            *args: all of the hook's arguments, in the order of its spec
                (gateway/hookspecs.py); or ``**kwargs``, by name (``flow=``,
                ``config=``, ``route=``). Each implementation gets those it names.

        Returns:
            ``(plugin name, result)`` of the first non-None result, or None when
            every plugin abstained.

        Raises:
            Raised: a plugin raised and ``fail_open`` is False.
        """
        if kwargs:
            args = self._by_name(hook, args, kwargs)
        for impl in self._impls[hook]:
            try:
                n = impl.prefix  # _Impl.call, inline: a Python call less per hook call
                result = impl.function(*args[:n]) if n is not None else impl.call(args)
                if (
                    result is not None
                    and result.__class__ not in _PLAIN_RESULTS
                    and inspect.isawaitable(result)
                ):
                    result = await result
            except Exception as exc:
                log.error("plugin %s raised in %s: %r", impl.plugin, hook, exc, exc_info=exc)
                if not fail_open:
                    raise Raised(impl.plugin, exc)
                continue
            if result is not None:
                return impl.plugin, result
        return None

    def offer(self, hook: str, *args: Any, **kwargs: Any) -> tuple[str, Any] | None:
        """The first non-None result, not awaited (the relay hook's awaitable
        is the relay itself: the caller awaits it). A raising plugin is
        logged and skipped. Arguments as :meth:`decide` takes them."""
        if kwargs:
            args = self._by_name(hook, args, kwargs)
        for impl in self._impls[hook]:
            try:
                n = impl.prefix  # _Impl.call, inline (as in decide)
                result = impl.function(*args[:n]) if n is not None else impl.call(args)
            except Exception:
                log.exception("plugin %s raised in %s", impl.plugin, hook)
                continue
            if result is not None:
                return impl.plugin, result
        return None

    def collect(self, hook: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Every plugin's non-None answer by plugin name; an error is logged and
        reported in its place, so one failing plugin cannot hide the others."""
        if kwargs:
            args = self._by_name(hook, args, kwargs)
        out: dict[str, Any] = {}
        for impl in self._impls[hook]:
            try:
                result = impl.call(args)
            except Exception as exc:
                log.exception("plugin %s raised in %s", impl.plugin, hook)
                out[impl.plugin] = {"error": repr(exc)}
                continue
            if result is not None:
                out[impl.plugin] = result
        return out

    def observe(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call every observer; one failing plugin cannot break the others.
        Arguments as :meth:`decide` takes them."""
        if kwargs:
            args = self._by_name(hook, args, kwargs)
        for impl in self._impls[hook]:
            try:
                n = impl.prefix  # _Impl.call, inline (as in decide)
                if n is not None:
                    impl.function(*args[:n])
                else:
                    impl.call(args)
            except Exception:
                log.exception("plugin %s raised in %s", impl.plugin, hook)

    def opened(self, flow: Flow) -> None:
        """``l4gw_connection_opened``, observed like :meth:`observe`; once an
        implementation (the telemetry plugin's, ``tryfirst``) has given the flow a
        span, that span becomes the current OpenTelemetry span for the rest of the
        flow's hooks (gateway/telemetry/context.py). An unsampled flow costs one
        slot read per implementation."""
        attached = False
        for impl in self._impls["l4gw_connection_opened"]:
            try:
                impl.function(flow) if impl.argnames else impl.function()
            except Exception:
                log.exception("plugin %s raised in l4gw_connection_opened", impl.plugin)
            if not attached and flow.span is not None:
                flow.span.attach()
                attached = True

    def closed(self, flow: Flow) -> None:
        """``l4gw_connection_closed``, observed like :meth:`observe`; then the flow's
        span (if :meth:`opened` attached one) stops being the current span."""
        for impl in self._impls["l4gw_connection_closed"]:
            try:
                impl.function(flow) if impl.argnames else impl.function()
            except Exception:
                log.exception("plugin %s raised in l4gw_connection_closed", impl.plugin)
        span = flow.span
        if span is not None:
            span.detach()


def _idle_hooks(plugin: str, result: object) -> frozenset[str]:
    """The hooks an ``l4gw_configure`` result declares idle, checked."""
    where = f"plugin {plugin}: l4gw_configure returned {result!r}"
    if isinstance(result, str | bytes) or not isinstance(result, Iterable):
        raise PluginError(
            f"{where}: expected None or a collection of the per-connection hooks it has "
            "nothing to do for"
        )
    hooks = frozenset(result)
    unknown = sorted(h for h in hooks if h not in PER_CONNECTION)
    if unknown:
        raise PluginError(
            f"{where}: {', '.join(map(repr, unknown))} not a per-connection hook "
            f"(those are {', '.join(sorted(PER_CONNECTION))})"
        )
    return hooks


def load(
    disabled: Iterable[str] = (),
    extra: Mapping[str, object] | None = None,
    *,
    installed: bool = True,
) -> Plugins:
    """Load every plugin of the ``l4gw.plugins`` entry-point group.

    Args:
        disabled: plugin (entry point) names not to load.
        extra: ``{name: plugin object}`` registered as well (tests, embedding),
            after the installed ones.
        installed: False loads no entry point, only ``extra``.

    Raises:
        PluginError: a plugin failed to import or does not fit the contract (a
            hook name the contract lacks, a hook wrapper, an ``async def``
            implementation of a hook that is not awaited, a name taken twice).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set(disabled)
    infos: list[PluginInfo] = []
    eps = entry_points(group=ENTRY_POINT_GROUP) if installed else ()
    for ep in sorted(eps, key=lambda e: e.name):
        if ep.name in blocked or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            raise PluginError(f"plugin {ep.name} ({ep.value}) failed to load: {exc!r}") from exc
        dist = ep.dist
        infos.append(
            PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist.name if dist else "?",
                version=dist.version if dist else "?",
                hooks=_hooks_of(pm, plugin),
            )
        )
    for name, plugin in (extra or {}).items():
        try:
            pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            # ValueError: the name (or the very object) is registered already.
            raise PluginError(f"plugin {name}: {exc}") from exc
        infos.append(PluginInfo(name, repr(plugin), "(embedded)", "", _hooks_of(pm, plugin)))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    _check_calling_conventions(pm)
    return Plugins(pm, infos)


def _check_calling_conventions(pm: pluggy.PluginManager) -> None:
    """Refuse what the drivers would silently get wrong (the module's rules)."""
    for name in sorted(dir(pm.hook)):
        if not name.startswith("l4gw_"):
            continue
        for impl in getattr(pm.hook, name).get_hookimpls():
            where = f"plugin {impl.plugin_name}: {name}"
            if impl.wrapper or impl.hookwrapper:
                kind = "wrapper=True" if impl.wrapper else "hookwrapper=True"
                raise PluginError(
                    f"{where}: hook wrappers ({kind}) are not supported: l4gw calls each "
                    "implementation itself, and decision hooks may be async, which a "
                    "wrapper cannot await; use an ordinary implementation "
                    "(@hookimpl(tryfirst=True) runs before the others)"
                )
            if name not in AWAITED and _is_async(impl.function):
                raise PluginError(
                    f"{where}: is async def, but this hook is called synchronously and its "
                    "result is not awaited (the coroutine would never run); make it a plain "
                    "function and hand waiting work to a task started from l4gw_startup"
                )


def _is_async(function: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


def _hooks_of(pm: pluggy.PluginManager, plugin: object) -> tuple[str, ...]:
    callers = pm.get_hookcallers(plugin) or []
    return tuple(sorted(c.name for c in callers))
