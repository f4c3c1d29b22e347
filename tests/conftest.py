"""Shared fixtures: gateway processes, and the privileged-test policy.

A test marked ``privileged`` (namespaces, nftables, BPF) is skipped only when
not root *and* not under CI; under CI a privileged test that cannot run fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gwproc import GatewayProcess, installation_readable_by

if TYPE_CHECKING:
    # Imported by the fixtures that use them: grpc and protobuf load only in the
    # tests that ask for a receiver.
    from redisproc import RedisServer

    from otlp_receiver import OTLPReceiver

IS_ROOT = os.geteuid() == 0
IN_CI = bool(os.environ.get("CI"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT or IN_CI:
        return
    skip = pytest.mark.skip(reason="needs root (and CI is unset)")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: ``gateway(config_text, name="gw")`` starts ``l4gw run`` and waits until ready."""
    started: list[GatewayProcess] = []

    def start(
        config: str, name: str = "gw", wait_ready: bool = True, **kw: object
    ) -> GatewayProcess:
        gw = GatewayProcess(tmp_path, config, name, **kw)  # type: ignore[arg-type]
        started.append(gw)
        return gw.start(wait_ready=wait_ready)

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    """A real OTLP receiver (gRPC and HTTP) on loopback, stopped after the test."""
    from otlp_receiver import OTLPReceiver

    r = OTLPReceiver()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real, throwaway redis-server on a free loopback port, stopped after the test."""
    from redisproc import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def readable_by_nobody() -> Iterator[None]:
    """The installation a dropping gateway runs from is enterable by ``nobody``
    (gwproc.installation_readable_by)."""
    with installation_readable_by("nobody"):
        yield
