"""The public surface, pinned (as trio's test_exports.py pins trio's).

``gateway.__all__`` is the plugin API, ``gateway.schema.__all__`` the converters a
plugin declares its section with, ``gateway.testing.__all__`` what its tests use;
``gateway.relay`` and ``gateway.telemetry`` are semi-public namespaces whose
``__all__`` lists the modules a plugin may import. A change to any of these lists
is a change of the API: it fails here first, and is made here on purpose.

Also pinned: one hook list, the same in gateway/hookspecs.py, README.md and
docs/plugins.md; and the admin endpoint's paths, listed wherever the docs list them.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gateway import admin, hookspecs

ROOT = Path(__file__).resolve().parents[2]

PUBLIC: dict[str, list[str]] = {
    "gateway": [
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
    ],
    "gateway.schema": [
        "Converter",
        "Field",
        "Invalid",
        "Schema",
        "address",
        "boolean",
        "choice",
        "duration",
        "integer",
        "list_of",
        "name",
        "network",
        "number",
        "port",
        "positive_duration",
        "secret_file",
        "size",
        "string",
        "table",
    ],
    "gateway.testing": [
        "DEFAULT_LISTENER",
        "L4GW_COMMAND",
        "ConfigError",
        "Decision",
        "GatewayProcess",
        "PluginError",
        "Plugins",
        "close_flow",
        "gateway_process",
        "load_plugins",
        "make_config",
        "make_flow",
        "run_decisions",
    ],
    "gateway.shield": [
        "Entry",
        "ShieldRefused",
        "add",
        "entries",
        "kernel_enabled",
        "lookup",
        "remove",
    ],
    "gateway.discovery": [
        "DiscoveryError",
        "EndpointSet",
        "Registry",
        "endpoints",
        "name_specs",
        "publish",
        "registry",
        "subscribe",
    ],
    "gateway.relay": ["copy", "policy", "sockmap", "splice", "stats", "tiers"],
    "gateway.telemetry": ["flows", "providers", "recorder", "records"],
}

HOOK_KINDS = ("lifecycle", "decision", "observer")


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_all_is_pinned(name: str) -> None:
    module = importlib.import_module(name)
    declared = list(module.__all__)
    assert len(set(declared)) == len(declared), f"{name}.__all__ repeats a name"
    assert sorted(declared) == sorted(PUBLIC[name])


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_name_in_all_exists(name: str) -> None:
    module = importlib.import_module(name)
    for attr in module.__all__:
        if hasattr(module, "__path__") and importlib.util.find_spec(f"{name}.{attr}"):
            # A package's __all__ may list its modules: importable, and modules.
            assert isinstance(importlib.import_module(f"{name}.{attr}"), types.ModuleType)
        else:
            assert hasattr(module, attr), f"{name}.__all__ lists {attr!r}, which is missing"
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)
    assert set(module.__all__) <= set(namespace)


def test_the_plugin_api_names_are_the_ones_the_docs_show() -> None:
    """The values a hook gets and returns are importable from ``gateway`` itself."""
    import gateway

    for attr in ("Flow", "Refusal", "Route", "CloseReason", "Config", "Field", "hookimpl"):
        assert getattr(gateway, attr) is not None


def test_testing_imports_without_pytest() -> None:
    """pytest is optional: everything but the fixture works without it."""
    code = (
        "import sys\n"
        "sys.modules['pytest'] = None  # import pytest raises ImportError\n"
        "import gateway.testing as t\n"
        "assert 'pytest' not in {m for m in sys.modules if sys.modules[m] is not None}\n"
        "assert not hasattr(t, 'gateway_process') and 'gateway_process' not in t.__all__\n"
        "flow = t.make_flow(client='198.18.7.9')\n"
        "print(flow.client, t.GatewayProcess.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('198.18.7.9', 40000) GatewayProcess"


# --- one hook list ----------------------------------------------------------------------


def hookspec_kinds() -> dict[str, list[str]]:
    """The hooks of each kind, from gateway/hookspecs.py's docstring bullets."""
    doc = hookspecs.__doc__ or ""
    out = {}
    for kind, title in zip(HOOK_KINDS, ("Lifecycle", "Decisions", "Observers"), strict=True):
        match = re.search(rf"\*\*{title}\*\* \((.*?)\)", doc, re.S)
        assert match, f"hookspecs.py's docstring lists no {title}"
        out[kind] = re.findall(r"``(l4gw_\w+)``", match.group(1))
    return out


def markdown_kinds(path: Path) -> dict[str, list[str]]:
    """The hooks of each kind, from a markdown table whose rows start ``| <kind> |``."""
    out = {}
    text = path.read_text()
    for kind in HOOK_KINDS:
        rows = re.findall(rf"^\| {kind} \| ([^|]*)\|", text, re.M)
        assert len(rows) == 1, f"{path.name}: one table row for {kind} hooks expected"
        out[kind] = re.findall(r"`(l4gw_\w+)`", rows[0])
    return out


def test_one_hook_list_in_hookspecs_readme_and_plugins_md() -> None:
    declared = sorted(n for n in dir(hookspecs) if n.startswith("l4gw_"))
    kinds = hookspec_kinds()
    assert sorted(n for names in kinds.values() for n in names) == declared
    assert markdown_kinds(ROOT / "README.md") == kinds
    assert markdown_kinds(ROOT / "docs" / "plugins.md") == kinds


def test_every_hook_has_an_example_in_plugins_md() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^### `(l4gw_\w+)\(", text, re.M))
    headings |= set(re.findall(r"^### `l4gw_\w+\(\)` and `(l4gw_\w+)\(", text, re.M))
    declared = {n for n in dir(hookspecs) if n.startswith("l4gw_")}
    assert headings == declared


# --- the admin endpoint's paths ---------------------------------------------------------


@pytest.mark.parametrize(
    "doc,section",
    [("docs/configuration.md", "## `[admin]`"), ("docs/operations.md", "### The admin endpoint")],
)
def test_admin_paths_are_listed_together(doc: str, section: str) -> None:
    text = (ROOT / doc).read_text()
    start = text.index(section)
    first_paragraph = text[start : text.index("\n\n", text.index("\n\n", start) + 2)]
    missing = [p for p in admin.PATHS if f"`{p}`" not in first_paragraph]
    assert not missing, f"{doc} ({section}) does not list {missing}"
