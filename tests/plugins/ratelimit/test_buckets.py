"""plugins/ratelimit/buckets.py: the types the plugin and the Redis store share."""

from __future__ import annotations

import subprocess
import sys


def test_the_redis_store_and_the_buckets_need_nothing_of_the_plugin() -> None:
    """buckets is below both plugin and redis (no cycle between those two); it is pure:
    no trio."""
    code = (
        "import sys\n"
        "import l4gw_plugins.ratelimit.buckets\n"
        "assert 'trio' not in sys.modules, 'buckets imported trio'\n"
        "import l4gw_plugins.ratelimit.redis\n"
        "assert 'l4gw_plugins.ratelimit.plugin' not in sys.modules, 'redis imported the plugin'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
