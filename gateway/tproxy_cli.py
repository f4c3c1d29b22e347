"""``l4gw tproxy setup|teardown|status|doctor``: the TPROXY plumbing from a shell.

Exit codes: 0 done (setup, teardown), matches (status), all well (doctor);
1 it failed, differs, or doctor found a problem; 2 the configuration is
invalid or has no ``[tproxy]`` section.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .config import Config, ConfigError
from .plugin_manager import PluginError

EXIT_PROBLEM = 1
EXIT_CONFIG = 2


def register(subparsers: Any) -> None:
    """Add ``tproxy`` and its actions to the ``l4gw`` command line."""
    tp = subparsers.add_parser(
        "tproxy",
        help="TPROXY plumbing: nftables table and policy routing",
        description="Install, remove, show and check what [tproxy] asks for: the nftables "
        "table inet l4gw, and per address family a fwmark ip rule and a local default route.",
    )
    actions = tp.add_subparsers(metavar="ACTION")
    for name, func, text in (
        ("setup", cmd_setup, "install or update (idempotent; the table is swapped atomically)"),
        ("teardown", cmd_teardown, "remove everything l4gw installed (also after a crash)"),
        ("status", cmd_status, "show what is installed and whether it matches the config"),
        ("doctor", cmd_doctor, "check what would make TPROXY fail silently, with fixes"),
    ):
        p = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        help_text = "TOML configuration file"
        if name == "teardown":
            help_text += " (optional: teardown removes what is tagged as l4gw's)"
        p.add_argument("-c", "--config", required=name != "teardown", help=help_text)
        p.set_defaults(func=func)

    def usage(args: argparse.Namespace) -> int:
        tp.print_help()
        return EXIT_CONFIG

    tp.set_defaults(func=usage)


def _config(path: str) -> Config | None:
    from .cli import load_config

    try:
        config, _ = load_config(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return None
    except PluginError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return None
    if config.tproxy is None:
        print(f"{path}: no [tproxy] section", file=sys.stderr)
        return None
    return config


def cmd_setup(args: argparse.Namespace) -> int:
    from .tproxy import TproxyError, apply, plan, summary

    config = _config(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        changes = apply(config)
    except TproxyError as exc:
        print(f"tproxy setup: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    for change in changes:
        print(change)
    print(f"set up: {summary(plan(config))}")
    return 0


def cmd_teardown(args: argparse.Namespace) -> int:
    from .tproxy import TproxyError, teardown

    if args.config is not None and _config(args.config) is None:
        return EXIT_CONFIG
    try:
        removed = teardown()
    except TproxyError as exc:
        print(f"tproxy teardown: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    for item in removed:
        print(f"removed {item}")
    print("torn down" if removed else "nothing to remove")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .tproxy import TABLE_FAMILY, TABLE_NAME, TproxyError, differences, status

    config = _config(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        p, state = status(config)
    except TproxyError as exc:
        print(f"tproxy status: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    table = f"nftables table {TABLE_FAMILY} {TABLE_NAME}"
    what = f"installed, {len(state.rule_comments)} rules" if state.table else "not installed"
    print(f"{table}: {what}")
    for comment in state.rule_comments:
        mark = "ok   " if comment in {r.comment for r in p.rules} else "extra"
        print(f"  {mark} rule: {comment}")
    for item in (*p.ip_rules, *p.routes):
        installed = item in state.ip_rules or item in state.routes
        print(f"{'installed' if installed else 'MISSING  '}  {item}")
    for item in (*state.ip_rules, *state.routes):
        if item not in p.ip_rules and item not in p.routes:
            print(f"STALE      {item}")
    diffs = differences(p, state)
    if not diffs:
        print(f"status: matches {config.path}")
        return 0
    print(f"status: differs from {config.path}:")
    for diff in diffs:
        print(f"  {diff}")
    return EXIT_PROBLEM


def cmd_doctor(args: argparse.Namespace) -> int:
    from .tproxy import TproxyError
    from .tproxy_doctor import FAIL, doctor

    config = _config(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        findings = doctor(config)
    except TproxyError as exc:
        print(f"tproxy doctor: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for f in findings:
        print(f"{f.level:<5} {f.text}")
        if f.fix:
            print(f"      fix: {f.fix}")
    failed = sum(f.level == FAIL for f in findings)
    print(f"doctor: {failed} problem{'s' if failed != 1 else ''}" if failed else "doctor: all well")
    return EXIT_PROBLEM if failed else 0
