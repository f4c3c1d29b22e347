"""Fuzz target: the configuration loader (gateway/config.py), on arbitrary file contents.

:func:`check` writes the input to a file and reads it the way ``l4gw check`` and
``l4gw run`` do: ``[gateway] disable_plugins`` first (gateway/cli/common.py), then
``config.load`` with the schemas of the built-in plugins. The only outcomes allowed
are a Config and a ConfigError listing its problems; any other exception is a crash
(an operator would see a traceback instead of the key that is wrong). tomllib is
instrumented as well, so the fuzzer learns TOML's syntax from its coverage.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fuzzing import instrumented, main

with instrumented(__name__, include=["gateway", "l4gw_plugins", "tomllib"]):
    import tomllib  # noqa: F401  (imported here so that it is instrumented)

    from gateway import config
    from gateway.cli import common as cli
    from gateway.plugin_manager import load as load_plugins

    SCHEMAS = load_plugins().schemas()  # imports the built-in plugins, instrumented
# An unlinked file, reached through /proc: libFuzzer ends the process without running
# Python's exit handlers, and nothing may be left behind in /tmp.
_FILE = tempfile.TemporaryFile(prefix="l4gw-fuzz-config-")
PATH = Path(f"/proc/self/fd/{_FILE.fileno()}")


def check(data: bytes) -> None:
    os.ftruncate(_FILE.fileno(), 0)
    os.pwrite(_FILE.fileno(), data, 0)
    disabled = cli.disabled_plugins(str(PATH))
    assert isinstance(disabled, list) and all(isinstance(name, str) for name in disabled)
    try:
        loaded = config.load(PATH, SCHEMAS)
    except config.ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems), exc
        assert exc.report().startswith(str(PATH))
        return
    assert loaded.listeners, "a config without a listener was accepted"


if __name__ == "__main__":
    main(check)
