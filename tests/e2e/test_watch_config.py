"""``[gateway] watch_config``, ``/status``'s last reload and ``l4gw.reloads`` on a real
``l4gw run``, logging ``log_format = "json"``.

The config file is replaced the way Kubernetes updates a mounted ConfigMap: the
path is a symlink through ``..data``, itself a symlink swapped atomically to a
new directory. A good file is picked up (a new listener serves); a broken one
is refused with the running config kept, and the failure is in ``/status`` and
in the reload counter. Every line the gateway logged is one JSON object.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from adminhttp import get
from backends import echo_server
from gwproc import free_port

pytestmark = pytest.mark.timeout(60)


def config(ports: list[int], admin: int, backend: int, workers: int) -> str:
    listeners = "".join(
        f'[[listener]]\nname = "l{i}"\nbind = "127.0.0.1:{p}"\n\n'
        f'[[route]]\nlistener = "l{i}"\ncluster = "echo"\n\n'
        for i, p in enumerate(ports)
    )
    return f"""
[gateway]
drain_timeout = "1s"
workers = {workers}
watch_config = true
log_format = "json"

{listeners}
[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[admin]
bind = "127.0.0.1:{admin}"
"""


def swap(path: Path, version: str, text: str) -> None:
    """What the kubelet does: a new directory, then ``..data`` renamed onto a symlink to it."""
    base = path.parent / "configmap"
    (base / version).mkdir(parents=True)
    (base / version / path.name).write_text(text)
    tmp = base / "..data_tmp"
    tmp.symlink_to(version)
    os.replace(tmp, base / "..data")
    if not path.is_symlink():
        link = path.with_suffix(".link")
        link.symlink_to(base / "..data" / path.name)
        os.replace(link, path)


async def status(admin: int) -> dict[str, Any]:
    code, body = await trio.to_thread.run_sync(get, admin, "/status")
    assert code == 200, body
    document: dict[str, Any] = json.loads(body)["reload"]
    return document


async def reloads(admin: int) -> dict[str, float]:
    code, body = await trio.to_thread.run_sync(get, admin, "/metrics")
    assert code == 200, body
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "l4gw_reloads_total"
    }


async def echoes(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    async with stream:
        await stream.send_all(b"ping")
        return await stream.receive_some(4) == b"ping"


@pytest.mark.parametrize("workers", [1, 2])
async def test_replaced_file_reloads_broken_file_is_refused(nursery, gateway, workers):
    backend = await nursery.start(echo_server)
    first, second, admin = free_port(), free_port(), free_port()
    gw = gateway(config([first], admin, backend, workers))
    await gw.await_log("ready: ", count=workers)  # worker 0 serves the admin endpoint
    assert await echoes(first)
    assert (await status(admin))["last"] is None

    # A good file, through the ConfigMap's symlinks: a second listener.
    swap(gw.config_path, "v1", config([first, second], admin, backend, workers))
    await gw.await_log("reloaded ", timeout=15, count=workers)
    assert await echoes(second)
    reload = await status(admin)
    assert reload["last"]["ok"] is True and reload["ok"] == 1 and reload["error"] == 0
    assert (
        time.time() - 60
        < time.mktime(time.strptime(reload["last"]["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        < time.time() + 60
    )

    # A broken file: refused, the running config stays.
    swap(gw.config_path, "v2", '[gateway]\nworkers = "many"\n')
    await gw.await_log("reload failed", timeout=15, count=workers)
    reload = await status(admin)
    assert reload["last"]["ok"] is False
    assert "gateway.workers" in reload["last"]["error"]
    assert reload["ok"] == 1 and reload["error"] == 1
    assert await echoes(first) and await echoes(second)
    counts = await reloads(admin)
    # Every worker counts its own reloads (the endpoint sums them).
    assert counts == {"ok": workers, "error": workers}

    # One reload per change: nothing more happens while the file stays.
    await trio.sleep(2.5)
    assert gw.log.count("reload failed") == workers

    lines = gw.log.splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert record["time"].endswith("Z") and record["time"][10] == "T"
        assert ("pid" in record) == (workers > 1)
