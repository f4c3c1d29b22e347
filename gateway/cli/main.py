"""The ``l4gw`` command: ``run``, ``check``, ``demo``, ``plugins``, and the
subcommands of gateway/cli/tproxy.py (``tproxy``), gateway/cli/accel.py
(``accel``) and gateway/cli/shield.py (``shield``); what they share is in
gateway/cli/common.py.

Exit codes: 0 success; 1 the gateway could not run (a port in use, a plugin
that failed to start), or ``check --resolve`` found a name that does not
resolve; 2 the configuration is invalid (every problem listed with its key path).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio
import trio.lowlevel

from gateway import __version__, configwatch, sdnotify
from gateway import config as config_mod
from gateway.cli import accel, shield, tproxy
from gateway.cli.common import (
    EXIT_CONFIG,
    EXIT_RUNTIME,
    load_or_report,
    setup_logging,
    startup_failures,
)
from gateway.config import Config, ConfigError
from gateway.plugin_manager import PluginError, Plugins
from gateway.plugin_manager import load as load_plugins
from gateway.process import raise_open_file_limit
from gateway.workers import EXIT_START_FAILED, supervise

log = logging.getLogger("l4gw")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_CONFIG
    result: int = args.func(args)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="l4gw", description="A pluggable L4 (TCP/UDP) gateway with TPROXY ingestion."
    )
    p.add_argument("--version", action="version", version=f"l4gw {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway", description="Run the gateway.")
    run.add_argument("-c", "--config", required=True, help="TOML configuration file")
    run.add_argument("--log-level", help="override [gateway] log_level")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check", help="validate a configuration", description="Validate a configuration file."
    )
    check.add_argument("-c", "--config", required=True, help="TOML configuration file")
    check.add_argument(
        "--resolve",
        action="store_true",
        help="also resolve every name and SRV name once and print what each gives "
        "(exit 1 if any fails)",
    )
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser(
        "demo",
        help="run the gateway in front of two built-in backends",
        description="The embedded default: the gateway on loopback in front of two small "
        "HTTP backends, round robin, one log line per connection. Ctrl-C stops it.",
    )
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument(
        "--telemetry",
        choices=("console", "none"),
        default="none",
        help="print a span per connection on the console",
    )
    demo.set_defaults(func=cmd_demo)

    plugins = sub.add_parser(
        "plugins", help="list installed plugins", description="List installed plugins."
    )
    plugins.set_defaults(func=cmd_plugins)

    tproxy.register(sub)
    accel.register(sub)
    shield.register(sub)
    return p


def cmd_check(args: argparse.Namespace) -> int:
    loaded = load_or_report(args.config)
    if loaded is None:
        return EXIT_CONFIG
    for note in loaded[0].notes:
        print(f"{args.config}: note: {note}")
    print("ok")
    if args.resolve:
        from gateway.cli.resolve import check_resolve

        return check_resolve(loaded[0])
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    loaded = load_or_report(args.config)
    if loaded is None:
        return EXIT_CONFIG
    config, plugins = loaded
    setup_logging(
        args.log_level or config.gateway.log_level,
        config.gateway.workers,
        config.gateway.log_format,
    )
    # systemd's socket is this process's alone: workers and exporters do not inherit it.
    sdnotify.take()
    raise_open_file_limit(config)
    for note in config.notes:
        log.info("%s: %s", config.path, note)
    if config.tproxy is not None and config.tproxy.manage:
        from gateway.tproxy.plan import TproxyError
        from gateway.tproxy.state import managed

        try:
            # [tproxy] manage = true: rules up before the listeners, down after the drain.
            with managed(config):
                return run_gateway(config, plugins)
        except TproxyError as exc:
            log.error("tproxy: %s", exc)
            return EXIT_RUNTIME
    return run_gateway(config, plugins)


def run_gateway(config: Config, plugins: Plugins) -> int:
    from gateway.shield.startup import shield_installed

    # The kernel shield is loaded once, here, before the workers fork (they share its maps).
    with shield_installed(config):
        return _run_workers(config, plugins)


def _run_workers(config: Config, plugins: Plugins) -> int:
    if config.gateway.workers > 1:
        # A worker restarted after a crash serves the config the others serve: the
        # last one a SIGHUP loaded without problems, not the one from start-up.
        current = [config]

        def reload() -> None:
            try:
                names = [i.name for i in plugins.infos]
                current[0] = config_mod.load(current[0].path, plugins.schemas(), names)
            except ConfigError:
                pass  # each worker reports the problems; the running config stays

        watch = configwatch.ConfigWatch()
        next_poll = [0.0]

        def tick() -> None:
            # Called at every report too: poll at the watch's own pace, so that its
            # "unchanged for one more poll" rule still means a second of stillness.
            now = time.monotonic()
            if now < next_poll[0]:
                return
            next_poll[0] = now + configwatch.POLL
            if watch.poll(current[0]):
                log.info("%s changed: reloading", current[0].path)
                configwatch.request_reload()

        reports = sdnotify.WorkerReports(config.gateway.workers, sdnotify.current(), tick)
        return supervise(
            config.gateway.workers,
            lambda i: run_one(current[0], plugins, i),
            on_reload=reload,
            reports=reports,
        )
    code = run_one(config, plugins, 0)
    return EXIT_RUNTIME if code == EXIT_START_FAILED else code


def run_one(config: Config, plugins: Plugins, worker: int) -> int:
    """Serve in this process (worker ``worker`` of ``[gateway] workers``).

    Returns:
        0 after a stop; :data:`EXIT_RUNTIME` when serving failed;
        :data:`~gateway.workers.EXIT_START_FAILED` when it failed before it was ready
        (a port in use, a missing capability), each cause logged in one line without
        a traceback.
    """
    from gateway.server import Gateway

    gateway = Gateway(config, plugins, worker)
    tune_gc()
    try:
        trio.run(gateway.serve)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        causes = startup_failures(exc)
        if causes is None:
            raise
        for cause in causes:
            log.error("%s", cause)
        return EXIT_RUNTIME if gateway.started else EXIT_START_FAILED
    return 0


def tune_gc() -> None:
    """Keep the cyclic GC off the connection path.

    Everything imported and configured so far lives as long as the process:
    freezing it spares every collection from walking it, and a higher
    first-generation threshold makes collections rarer (connections make few
    cycles). Measured: -7% CPU per connection (bench/README.md).
    """
    gc.freeze()
    gc.set_threshold(20000, 50, 100)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.cli.demo import demo_config, free_port, http_backend
    from gateway.server import Gateway

    setup_logging("info")
    b1, b2 = free_port(), free_port()
    raw = demo_config(args.port, b1, b2, args.telemetry)
    plugins = load_plugins()
    try:
        config = config_mod.from_dict(raw, "<demo>", plugins.schemas())
    except ConfigError as exc:  # pragma: no cover - the embedded config is tested
        print(exc.report(), file=sys.stderr)
        return EXIT_CONFIG

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(http_backend, "backend-1", b1)
            await nursery.start(http_backend, "backend-2", b2)
            gateway = Gateway(config, plugins)

            async def serve_then_stop(*, task_status: Any) -> None:
                await gateway.serve(task_status=task_status)
                # The gateway has drained; stop the backends too.
                nursery.cancel_scope.cancel()

            await nursery.start(serve_then_stop)
            print(
                f"\nl4gw demo: the gateway listens on 127.0.0.1:{args.port} in front of two "
                f"backends (127.0.0.1:{b1}, 127.0.0.1:{b2}), round robin.\n"
                f"Try:  curl http://127.0.0.1:{args.port}/   (twice: each backend answers "
                "in turn)\nCtrl-C stops it.\n",
                flush=True,
            )

    try:
        trio.run(main)
    except OSError as exc:
        log.error("%s", exc)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    try:
        plugins = load_plugins()
    except PluginError as exc:
        print(exc, file=sys.stderr)
        return EXIT_RUNTIME
    for info in plugins.infos:
        hooks = ", ".join(h.removeprefix("l4gw_") for h in info.hooks)
        print(
            f"{info.name:<14} {info.distribution} {info.version}  {info.module}\n    hooks: {hooks}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
