"""plugins/ratelimit/resp.py: the primary found through a real Redis Sentinel."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redisproc import RedisServer

from l4gw_plugins.ratelimit.buckets import parse_url
from l4gw_plugins.ratelimit.resp import RedisUnavailable, RespClient, Sentinels

from gwproc import free_port

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[RedisServer, int]]:
    """A primary and one sentinel monitoring it as "primary-t"."""
    primary = RedisServer(tmp_path).start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"  # a sentinel rewrites its file: one of its own
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor primary-t 127.0.0.1 {primary.port} 1\n"
    )
    exe = shutil.which("redis-server")
    assert exe
    with open(tmp_path / "sentinel.log", "wb") as log:
        proc = subprocess.Popen([exe, str(conf), "--sentinel"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        probe = RedisServer(tmp_path, port=port)
        while not probe.ping():
            assert proc.poll() is None, (tmp_path / "sentinel.log").read_text()
            assert time.monotonic() < deadline, "sentinel did not answer"
            time.sleep(0.05)
        yield primary, port
    finally:
        proc.terminate()
        proc.wait(10)
        primary.stop()


async def test_the_primary_comes_from_the_sentinels(sentinel: tuple[RedisServer, int]) -> None:
    primary, sentinel_port = sentinel
    dead = free_port()  # the first sentinel is down: the next one answers
    client = RespClient(
        parse_url("redis://ignored.invalid:1/2"),
        sentinels=Sentinels("primary-t", (("127.0.0.1", dead), ("127.0.0.1", sentinel_port))),
    )
    assert await client.call("SET", "k", "v") == "OK"
    assert client.primary == ("127.0.0.1", primary.port)
    # It was on db 2 of the primary.
    direct = RespClient(parse_url(f"redis://127.0.0.1:{primary.port}/2"))
    assert await direct.call("GET", "k") == b"v"
    client.close()
    direct.close()

    unknown = RespClient(
        parse_url("redis://x/0"), sentinels=Sentinels("nope", (("127.0.0.1", sentinel_port),))
    )
    with pytest.raises(RedisUnavailable, match='no primary named "nope"'):
        await unknown.call("PING")
