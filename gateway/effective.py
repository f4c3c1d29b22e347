"""The effective configuration: the file with every default filled in, as ``/config`` shows it.

Envoy's ``/config_dump`` shows what the proxy runs, not what the operator
wrote; this is the same for l4gw: every key of every section the file has,
and every section of every loaded plugin, with its value from the file or
its default, secrets redacted (:func:`gateway.redact.redact_config`).

Rules kept here:

* **Written as the file would say it.** A key the file sets keeps the file's
  own value (``"30s"`` stays ``"30s"``); a default is written in the same
  notation (durations as ``"30s"``, sizes as ``"64KiB"``, addresses as
  ``"127.0.0.1:9901"``), so a copied value is valid in a file.
* **Sections the file leaves out** appear with their defaults when the
  gateway runs them all the same (``[gateway]``, ``[telemetry]``, every
  plugin section the configuration holds); optional sections that switch a
  feature on (``[tproxy]``, ``[admin]``, a cluster's ``health_check``) appear
  only when the file has them: their absence is the effective value.
* **Nested tables are found from the converters** (``table``, ``list_of``
  keep their schema in their closure): a schema change needs no change here.
  scripts/gen-config-docs.py reads the schemas with the same functions
  (:func:`converter_kind`, :func:`closure`, :func:`list_item`...).
* **Nothing secret leaves.** The result goes through ``redact_config``; a
  ``*_file`` key shows the path, never what was read from it.
"""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from gateway import config as config_mod
from gateway import schema as s
from gateway.redact import redact_config

_CORE: dict[str, tuple[str, s.Schema]] = {
    "gateway": ("table", config_mod.GATEWAY),
    "listener": ("array", config_mod.LISTENER),
    "route": ("array", config_mod.ROUTE),
    "cluster": ("named", config_mod.CLUSTER),
    "tproxy": ("table", config_mod.TPROXY),
    "telemetry": ("table", config_mod.TELEMETRY),
    "admin": ("table", config_mod.ADMIN),
    "dns": ("table", config_mod.DNS),
}
_ALWAYS = ("gateway", "telemetry")
"""Core sections in force even when the file leaves them out."""


def effective_config(
    config: config_mod.Config, plugin_schemas: Mapping[str, s.Schema]
) -> dict[str, Any]:
    """The running configuration with defaults filled in, secrets redacted.

    Args:
        config: the configuration in force.
        plugin_schemas: the loaded plugins' sections (``Plugins.schemas()``).
    """
    raw = config.raw
    out: dict[str, Any] = {}
    for section, (shape, schema) in _CORE.items():
        value = raw.get(section)
        if value is None:
            if section in _ALWAYS:
                out[section] = fill({}, schema)
            continue
        if shape == "table":
            out[section] = fill(value, schema)
        elif shape == "array" and isinstance(value, list):
            out[section] = [fill(item, schema) for item in value]
        elif shape == "named" and isinstance(value, Mapping):
            out[section] = {name: fill(item, schema) for name, item in value.items()}
        else:
            out[section] = value
    plugins_raw = raw.get("plugin", {})
    plugins: dict[str, Any] = {}
    for name, schema in plugin_schemas.items():
        # The sections the configuration holds: one the file leaves out whose schema
        # has a required key is not configured (Config.plugin), and shows as absent.
        if name in config.plugins:
            plugins[name] = fill(plugins_raw.get(name, {}), schema)
    if plugins:
        out["plugin"] = plugins
    result: dict[str, Any] = redact_config(out)
    return result


def fill(raw: Any, schema: s.Schema) -> Any:
    """A table of the file with every key of ``schema`` present."""
    if not isinstance(raw, Mapping):
        return raw
    out: dict[str, Any] = {}
    for key, field in schema.items():
        if key in raw:
            out[key] = _nested(raw[key], field.convert)
        elif field.default is not s.REQUIRED:
            out[key] = file_value(field.convert, field.default)
    for key in raw:  # validated already, so none; kept rather than hidden
        out.setdefault(key, raw[key])
    return out


def _nested(raw: Any, convert: s.Converter) -> Any:
    item = list_item(convert)
    if item is not None and isinstance(raw, list):
        inner = table_schema(item)
        return [fill(v, inner) if inner is not None else v for v in raw]
    inner = table_schema(convert)
    if inner is not None and isinstance(raw, Mapping):
        return fill(raw, inner)
    return raw


def file_value(convert: s.Converter, value: Any) -> Any:
    """A default (a runtime value) written as the file would write it."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, s.SecretFile):
        return value.path
    if convert in (s.duration, s.positive_duration) and isinstance(value, int | float):
        return format_duration(float(value))
    if (convert is s.size or converter_kind(convert) == "size_in") and isinstance(value, int):
        text = s.format_size(value)
        return value if text.isdigit() else text
    if _is_address(value):
        return s.format_address(value[0], value[1])
    if isinstance(value, tuple | list | frozenset):
        item = list_item(convert) or (lambda v: v)
        return [file_value(item, v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): file_value(lambda v: v, v) for k, v in value.items()}
    if isinstance(value, str | int | float):
        return value
    return str(value)


def format_duration(seconds: float) -> str:
    """Seconds as a duration string: ``30.0`` is ``"30s"``, ``0.25`` is ``"250ms"``."""
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        n = seconds / size
        if n >= 1 and abs(n - round(n)) < 1e-9:
            return f"{round(n)}{unit}"
    return f"{round(seconds * 1e6)}us"


def _is_address(value: Any) -> bool:
    """An ``(ip, port)`` pair, as :func:`gateway.schema.address` returns."""
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int)):
        return False
    try:
        ipaddress.ip_address(value[0])
    except ValueError:
        return False
    return True


def closure(fn: Callable[..., Any]) -> dict[str, Any]:
    """The variables a converter closes over (a factory's arguments: ``low``, ``item``...)."""
    try:
        return dict(inspect.getclosurevars(fn).nonlocals)
    except (TypeError, ValueError):
        return {}


def converter_kind(fn: Callable[..., Any]) -> str:
    """The converter's factory (``integer``, ``list_of``...) or its own name."""
    return str(getattr(fn, "__qualname__", "")).split(".<locals>")[0]


def is_schema(value: Any) -> bool:
    """A table schema: a non-empty mapping of :class:`gateway.schema.Field`."""
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(f, s.Field) for f in value.values())
    )


def list_item(fn: Callable[..., Any]) -> s.Converter | None:
    """The item converter of a ``list_of`` converter; None for any other."""
    if converter_kind(fn) == "list_of":
        item: s.Converter = closure(fn)["item"]
        return item
    return None


def table_schema(fn: Callable[..., Any], depth: int = 3) -> s.Schema | None:
    """The table schema a converter checks against, looked for in its closure."""
    if depth == 0:
        return None
    for value in closure(fn).values():
        if is_schema(value):
            found: s.Schema = value
            return found
        if callable(value):
            inner = table_schema(value, depth - 1)
            if inner is not None:
                return inner
    return None
