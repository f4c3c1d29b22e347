"""examples/jaeger: the compose file parses and everything it names exists and fits.

The stack itself cannot run here (no container images can be pulled); this
keeps the example from rotting: the compose file is valid YAML, its build
context and mounted files exist, the gateway's config passes ``l4gw check``,
its endpoints are the backends' addresses, and the exporter points at Jaeger's
OTLP port.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from gwproc import l4gw

HERE = Path(__file__).resolve().parents[2] / "examples" / "jaeger"


def load() -> dict:
    return yaml.safe_load((HERE / "compose.yaml").read_text())


def test_compose_parses_and_names_existing_paths():
    compose = load()
    services = compose["services"]
    assert {"jaeger", "gateway", "backend", "broken"} <= set(services)
    assert services["backend"]["deploy"]["replicas"] == 2
    jaeger_ports = {p.rsplit(":", 1)[-1] for p in services["jaeger"]["ports"]}
    assert {"4317", "4318", "16686"} <= jaeger_ports
    assert "jaegertracing/jaeger:2." in services["jaeger"]["image"]

    gateway = services["gateway"]
    context = (HERE / gateway["build"]["context"]).resolve()
    assert (context / gateway["build"]["dockerfile"]).is_file()
    for volume in gateway["volumes"]:
        source = volume.split(":")[0]
        assert (HERE / source).exists(), volume
    env = gateway["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] in ("http://jaeger:4318", "http://jaeger:4317")
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] in ("http/protobuf", "grpc")
    assert set(gateway["depends_on"]) == {"jaeger", "backend", "broken"}
    # Found by name: no service has a fixed address for the config to repeat.
    assert "ipv4_address" not in (HERE / "compose.yaml").read_text()


def test_gateway_config_checks_and_names_the_backends():
    result = l4gw("check", "-c", str(HERE / "gateway.toml"))
    assert result.returncode == 0, result.stderr
    compose = load()
    text = (HERE / "gateway.toml").read_text()
    port = compose["services"]["backend"]["command"][1]
    assert f'endpoints = ["backend:{port}", "broken:{port}"]' in text
    # broken listens elsewhere, so the gateway's connects to it are refused.
    assert compose["services"]["broken"]["command"][1] != port
    listen = compose["services"]["gateway"]["ports"][0].split(":")[-1]
    assert f'bind = "0.0.0.0:{listen}"' in text
