"""Everything under examples/ works as shipped, and the configuration reference is current.

* Every gateway config (``examples/**/*.toml`` except Python package metadata, and
  every ``*.toml`` held in a Kubernetes ConfigMap) passes ``l4gw check``. A config
  whose ``[plugin.X]`` section belongs to a plugin that is not installed is skipped
  outside CI (under CI, scripts/install.sh installs the example plugins: a miss fails).
* Every YAML file (manifests, compose files) parses, and the paths it names exist:
  compose build contexts, Containerfiles, bind-mounted files and env files; kustomize
  resources; the ConfigMaps (and their keys) that pod specs mount.
* examples/gateway.toml sets every key of the core schema, with a comment.
* docs/configuration.md is what scripts/gen-config-docs.py prints now.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config
from gateway.plugin_manager import load as load_plugins
from gateway.schema import Field

from gwproc import l4gw

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
IN_CI = bool(os.environ.get("CI"))
# Python package metadata, not gateway configs.
NOT_CONFIGS = {"pyproject.toml"}
SKIP_DIRS = {".venv", "__pycache__", "node_modules", ".git"}


def files(*patterns: str) -> list[Path]:
    found = {
        p
        for pattern in patterns
        for p in EXAMPLES.rglob(pattern)
        if not SKIP_DIRS & set(p.relative_to(EXAMPLES).parts) and ".egg-info" not in str(p)
    }
    return sorted(found)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


TOML_FILES = [p for p in files("*.toml") if p.name not in NOT_CONFIGS]
YAML_FILES = files("*.yaml", "*.yml")


def yaml_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in YAML_FILES:
        with path.open() as f:
            for doc in yaml.safe_load_all(f):
                if isinstance(doc, dict):
                    yield path, doc


def configmap_configs() -> list[tuple[str, str]]:
    """(id, TOML text) of every *.toml key of every ConfigMap under examples/."""
    found = []
    for path, doc in yaml_documents():
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith(".toml"):
                    found.append((f"{rel(path)}:{doc['metadata']['name']}:{key}", text))
    return found


def installed_sections() -> set[str]:
    return set(load_plugins().schemas())


def require_plugins(raw: Mapping[str, Any]) -> None:
    """Skip (fail under CI) when a [plugin.X] section has no installed plugin."""
    plugin = raw.get("plugin", {})
    missing = sorted(set(plugin) - installed_sections()) if isinstance(plugin, dict) else []
    if missing:
        message = f"plugin section(s) {missing} need a plugin that is not installed"
        if IN_CI:
            pytest.fail(message + " (scripts/install.sh installs the example plugins)")
        pytest.skip(message)


def test_examples_exist() -> None:
    """The globs below find what they should (an empty parametrization passes silently)."""
    assert EXAMPLES / "gateway.toml" in TOML_FILES
    assert EXAMPLES / "kubernetes" / "daemonset.yaml" in YAML_FILES
    assert configmap_configs()


# --- gateway configs ---------------------------------------------------------------------


@pytest.mark.parametrize("path", TOML_FILES, ids=rel)
def test_example_config_passes_check(path: Path) -> None:
    require_plugins(tomllib.loads(path.read_text()))
    result = l4gw("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# `token_file = "/run/secrets/..."`: a secret a pod mounts, absent on this machine.
SECRET_FILE = re.compile(r'^(\s*\w+_file\s*=\s*)"(/[^"]+)"', re.MULTILINE)


def secret_mounts() -> set[str]:
    """Mount paths of the Secret volumes of every pod spec under examples/."""
    found = set()
    for _, _, spec in pod_specs():
        secrets = {v["name"] for v in spec.get("volumes") or [] if "secret" in v}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts") or []:
                if mount["name"] in secrets:
                    found.add(mount["mountPath"].rstrip("/") + "/")
    return found


@pytest.mark.parametrize("name,text", [pytest.param(n, t, id=n) for n, t in configmap_configs()])
def test_configmap_config_passes_check(name: str, text: str, tmp_path: Path) -> None:
    """Each secret a config reads from a file is on a Secret mount of the pod (the check
    reads a stand-in, since the mount exists only in the cluster)."""
    require_plugins(tomllib.loads(text))
    mounts = secret_mounts()

    def stand_in(match: re.Match[str]) -> str:
        secret = match.group(2)
        assert any(secret.startswith(m) for m in mounts), f"{name}: {secret} is on no Secret mount"
        local = tmp_path / "secrets" / secret.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("stand-in-secret\n")
        return f'{match.group(1)}"{local}"'

    path = tmp_path / "gateway.toml"
    path.write_text(SECRET_FILE.sub(stand_in, text))
    result = l4gw("check", "-c", str(path))
    assert result.returncode == 0, f"{name}:\n{result.stderr}"


# --- YAML: manifests and compose files ------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path: Path) -> None:
    with path.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, f"{rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs)


def compose_paths(path: Path, doc: Mapping[str, Any]) -> Iterator[tuple[str, Path]]:
    """(what, path) for every local path a compose file names."""
    here = path.parent
    for name, service in (doc.get("services") or {}).items():
        build = service.get("build")
        if isinstance(build, str):
            build = {"context": build}
        if isinstance(build, dict):
            context = here / build.get("context", ".")
            yield f"services.{name}.build.context", context
            dockerfile = build.get("dockerfile")
            if dockerfile:
                yield f"services.{name}.build.dockerfile", context / dockerfile
        for volume in service.get("volumes") or []:
            if isinstance(volume, str):
                source = volume.split(":")[0]
            elif volume.get("type") == "bind":
                source = volume["source"]
            else:
                continue
            if source.startswith((".", "/", "~")):
                yield f"services.{name}.volumes", here / source
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            if isinstance(env_file, dict):
                env_file = env_file["path"]
            yield f"services.{name}.env_file", here / env_file
    for section in ("configs", "secrets"):
        for name, item in (doc.get(section) or {}).items():
            if isinstance(item, dict) and "file" in item:
                yield f"{section}.{name}.file", here / item["file"]


def kustomize_paths(path: Path, doc: Mapping[str, Any]) -> Iterator[tuple[str, Path]]:
    here = path.parent
    for key in ("resources", "components", "crds"):
        for item in doc.get(key) or []:
            if "://" not in item:
                yield key, here / item
    for gen in doc.get("configMapGenerator") or []:
        for item in gen.get("files") or []:
            yield "configMapGenerator.files", here / item.split("=")[-1]
    for patch in doc.get("patches") or []:
        if isinstance(patch, dict) and "path" in patch:
            yield "patches", here / patch["path"]


def referenced_paths() -> list[tuple[str, Path]]:
    found = []
    for path, doc in yaml_documents():
        if "services" in doc:
            found += [(f"{rel(path)}: {what}", p) for what, p in compose_paths(path, doc)]
        if doc.get("kind") == "Kustomization":
            found += [(f"{rel(path)}: {what}", p) for what, p in kustomize_paths(path, doc)]
    return found


def test_yaml_files_name_existing_paths() -> None:
    refs = referenced_paths()
    assert refs, "no compose file or kustomization found"
    missing = [f"{what} -> {p}" for what, p in refs if not p.exists()]
    assert not missing, "\n".join(missing)


def pod_specs() -> Iterator[tuple[str, Path, Mapping[str, Any]]]:
    for path, doc in yaml_documents():
        kind = doc.get("kind")
        if kind == "Pod":
            yield kind, path, doc["spec"]
        elif kind in ("DaemonSet", "Deployment", "StatefulSet", "Job", "ReplicaSet"):
            yield kind, path, doc["spec"]["template"]["spec"]


def test_pod_specs_mount_configmaps_that_exist() -> None:
    """A pod's configMap (and secret) volume names a ConfigMap (Secret) of the same
    directory, with the keys it mounts; and the container's ``-c`` file is on such a mount."""
    configmaps = {
        (path.parent, doc["metadata"]["name"]): doc.get("data") or {}
        for path, doc in yaml_documents()
        if doc.get("kind") == "ConfigMap"
    }
    secrets = {
        (path.parent, doc["metadata"]["name"]): {
            **(doc.get("data") or {}),
            **(doc.get("stringData") or {}),
        }
        for path, doc in yaml_documents()
        if doc.get("kind") == "Secret"
    }
    specs = list(pod_specs())
    assert specs
    for kind, path, spec in specs:
        mounted: dict[str, set[str]] = {}
        for volume in spec.get("volumes") or []:
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                data = secrets.get((path.parent, name))
                assert data is not None, f"{rel(path)}: {kind} mounts Secret {name}, not defined"
                for item in volume["secret"].get("items") or []:
                    assert item["key"] in data, f"{rel(path)}: {name} has no key {item['key']}"
            if "configMap" not in volume:
                continue
            name = volume["configMap"]["name"]
            data = configmaps.get((path.parent, name))
            assert data is not None, f"{rel(path)}: {kind} mounts ConfigMap {name}, not defined"
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                assert item["key"] in data, f"{rel(path)}: {name} has no key {item['key']}"
            mounted[volume["name"]] = {item["path"] for item in items}
        for container in spec["containers"]:
            args = [*container.get("command", []), *container.get("args", [])]
            if "-c" not in args:
                continue
            config_file = args[args.index("-c") + 1]
            on_mounts = {
                f"{m['mountPath'].rstrip('/')}/{p}"
                for m in container.get("volumeMounts") or []
                for p in mounted.get(m["name"], ())
            }
            assert config_file in on_mounts, f"{rel(path)}: {config_file} not in {on_mounts}"


# --- the annotated example ------------------------------------------------------------------


def _tables(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def example_coverage(raw: Mapping[str, Any]) -> dict[str, tuple[Mapping[str, Field], set[str]]]:
    """For each core schema (by its name in gateway.config): the keys the example sets."""
    listeners, routes = _tables(raw.get("listener")), _tables(raw.get("route"))
    clusters = list((raw.get("cluster") or {}).values())
    tproxy = raw.get("tproxy") or {}

    def keys(tables: list[Mapping[str, Any]]) -> set[str]:
        return {k for t in tables for k in t}

    return {
        "GATEWAY": (config.GATEWAY, keys(_tables(raw.get("gateway")))),
        "LISTENER": (config.LISTENER, keys(listeners)),
        "ROUTE": (config.ROUTE, keys(routes)),
        "ROUTE_SPLIT": (
            config.ROUTE_SPLIT,
            keys([s for r in routes for s in _tables(r.get("clusters"))]),
        ),
        "CLUSTER": (config.CLUSTER, keys(clusters)),
        "ENDPOINT_TABLE": (
            config.ENDPOINT_TABLE,
            keys([e for c in clusters for e in _tables(c.get("endpoints"))]),
        ),
        "HEALTH_CHECK": (
            config.HEALTH_CHECK,
            keys([h for c in clusters for h in _tables(c.get("health_check"))]),
        ),
        "OUTLIER": (config.OUTLIER, keys([o for c in clusters for o in _tables(c.get("outlier"))])),
        "TPROXY": (config.TPROXY, keys([tproxy])),
        "INTERCEPT": (config.INTERCEPT, keys(_tables(tproxy.get("intercept")))),
        "TELEMETRY": (config.TELEMETRY, keys(_tables(raw.get("telemetry")))),
        "ADMIN": (config.ADMIN, keys(_tables(raw.get("admin")))),
        "SHIELD": (config.SHIELD, keys(_tables(raw.get("shield")))),
        "SRV_TABLE": (
            config.SRV_TABLE,
            keys([e for c in clusters for e in _tables(c.get("endpoints")) if "srv" in e]),
        ),
        "DNS": (config.DNS, keys(_tables(raw.get("dns")))),
    }


def test_annotated_example_sets_every_core_key_with_a_comment() -> None:
    path = EXAMPLES / "gateway.toml"
    text = path.read_text()
    coverage = example_coverage(tomllib.loads(text))
    schemas = {
        name
        for name, value in vars(config).items()
        if isinstance(value, Mapping)
        and value
        and all(isinstance(f, Field) for f in value.values())
    }
    assert schemas == set(coverage), "a schema of gateway/config.py is not covered here"
    missing = [f"{name}.{key}" for name, (schema, seen) in coverage.items() for key in schema
               if key not in seen]  # fmt: skip
    assert not missing, f"examples/gateway.toml does not set: {missing}"

    commented: set[str] = set()
    for line in text.splitlines():
        code, hash_, comment = line.partition("#")
        if hash_ and comment.strip():
            commented.update(re.findall(r"([A-Za-z0-9_-]+)\s*=", code))
            # A table header sets its last key: [cluster.api.health_check]
            commented.update(m.split(".")[-1] for m in re.findall(r"^\s*\[+([\w.-]+)\]", code))
    uncommented = [f"{name}.{key}" for name, (schema, _) in coverage.items() for key in schema
                   if key not in commented]  # fmt: skip
    assert not uncommented, f"keys without a comment on their line: {uncommented}"


# --- the configuration reference -------------------------------------------------------------


def test_configuration_reference_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-config-docs.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert result.stdout == committed, (
        "docs/configuration.md is out of date: run "
        "`.venv/bin/python scripts/gen-config-docs.py > docs/configuration.md`"
    )


def test_probes_start_no_process() -> None:
    """Kubernetes probes ask the admin endpoint over HTTP: an exec probe would start an
    interpreter in the container every few seconds."""
    probed = 0
    for kind, path, spec in pod_specs():
        for container in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    probed += 1
                    assert "exec" not in container[probe], f"{rel(path)}: {kind} {probe} execs"
                    assert container[probe].get("httpGet", {}).get("path") in ("/healthz", "/readyz")
    assert probed
