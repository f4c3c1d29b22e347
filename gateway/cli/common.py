"""What every ``l4gw`` subcommand shares: exit codes, loading a configuration with its
plugins, logging, and the one-line report of a start-up that failed.

gateway/cli/main.py builds the command line from its own commands and those of
gateway/cli/tproxy.py and gateway/cli/accel.py; all three import this module,
and it imports none of them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gateway import config as config_mod
from gateway import logformat
from gateway.config import Config, ConfigError
from gateway.plugin_manager import PluginError, Plugins
from gateway.plugin_manager import load as load_plugins
from gateway.redact import RedactingFilter

EXIT_RUNTIME = 1
"""The gateway could not run (a port in use, a plugin that failed to start)."""
EXIT_CONFIG = 2
"""The configuration is invalid (every problem listed with its key path)."""


def setup_logging(level: str, workers: int = 1, log_format: str = "text") -> None:
    """Log to stderr at ``level``, as text lines or JSON objects (gateway/logformat.py);
    with several workers each line names its process."""
    handler = logging.StreamHandler(sys.stderr)
    # Whatever a plugin logs, a URL's password does not reach the log.
    handler.addFilter(RedactingFilter())
    logformat.install(handler, log_format, workers)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def disabled_plugins(path: str) -> list[str]:
    """``[gateway] disable_plugins`` read before validation (it decides which
    plugin schemas validation uses); errors surface in the full check."""
    try:
        raw = config_mod.read(path)
        value = raw.get("gateway", {}).get("disable_plugins", [])
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
    except (ConfigError, AttributeError):
        return []


def load_config(path: str) -> tuple[Config, Plugins]:
    """Load plugins, then the file validated against their schemas.

    Raises:
        ConfigError, PluginError.
    """
    plugins = load_plugins(disabled_plugins(path))
    names = [i.name for i in plugins.infos]
    return config_mod.load(path, plugins.schemas(), names), plugins


def load_or_report(path: str) -> tuple[Config, Plugins] | None:
    """:func:`load_config`, printing every problem to stderr instead of raising."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
    except PluginError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
    return None


def help_without_action(parser: argparse.ArgumentParser) -> None:
    """A command run without its action (``l4gw shield``) prints its help and exits
    :data:`EXIT_CONFIG`."""

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return EXIT_CONFIG

    parser.set_defaults(func=usage)


def startup_failures(exc: BaseException) -> list[str] | None:
    """The one-line messages of a start-up that failed on expected OS or plugin
    errors, or None when ``exc`` holds anything else (a bug: keep its traceback).

    trio wraps an error raised inside nurseries in exception groups; the leaves are
    what the operator needs (a bind's message names the socket and a hint:
    :func:`gateway.listeners.bind_error`).
    """
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(exc)
    if not leaves or not all(isinstance(e, OSError | PluginError) for e in leaves):
        return None
    return list(dict.fromkeys(str(e) for e in leaves))
