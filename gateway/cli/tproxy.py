"""``l4gw tproxy setup|teardown|status|doctor``: the TPROXY plumbing from a shell.

Exit codes: 0 done (setup, teardown), matches (status), all well (doctor);
1 it failed or was refused, differs, or doctor found a problem; 2 the
configuration is invalid or has no ``[tproxy]`` section.

``setup`` and ``teardown`` change the state of the network namespace they run
in, which a running ``[tproxy] manage = true`` gateway owns and guards
(gateway/tproxy/owner.py, gateway/tproxy/guard.py). While one does, both
refuse: a teardown would open the relay under the gateway's feet, and a setup
beside it would either be undone by its guard or fight it. The supported ways
are to stop the gateway (it tears down as it exits) or to change its config
and reload it (it applies a changed ``[tproxy]``). ``--force`` is the
operator's override, for a gateway that cannot be stopped or reloaded: it
records the take-over first, so the gateway stops guarding and leaves the
state alone at exit, then acts. Without a live owner they hold the ownership
lock while they work, so a gateway starting meanwhile waits its turn.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.cli.common import EXIT_CONFIG, help_without_action, load_or_report
from gateway.config import Config

EXIT_PROBLEM = 1


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
        if name in ("setup", "teardown"):
            p.add_argument(
                "--force",
                action="store_true",
                help="also while a running gateway owns the state: it then stops guarding it "
                "and leaves it in place at exit",
            )
        p.set_defaults(func=func)
    help_without_action(tp)


def _config(path: str) -> Config | None:
    loaded = load_or_report(path)
    if loaded is None:
        return None
    config = loaded[0]
    if config.tproxy is None:
        print(f"{path}: no [tproxy] section", file=sys.stderr)
        return None
    return config


def cmd_setup(args: argparse.Namespace) -> int:
    from gateway.tproxy.plan import plan, summary
    from gateway.tproxy.state import apply

    config = _config(args.config)
    if config is None:
        return EXIT_CONFIG
    code = _as_owner("setup", args.force, config.path, lambda: apply(config))
    if code == 0:
        print(f"set up: {summary(plan(config))}")
    return code


def cmd_teardown(args: argparse.Namespace) -> int:
    from gateway.tproxy.state import teardown

    if args.config is not None and _config(args.config) is None:
        return EXIT_CONFIG
    removed: list[str] = []

    def work() -> list[str]:
        removed.extend(teardown())
        return [f"removed {item}" for item in removed]

    code = _as_owner("teardown", args.force, args.config or "-", work)
    if code == 0:
        print("torn down" if removed else "nothing to remove")
    return code


def _as_owner(action: str, force: bool, config: str, work: Callable[[], list[str]]) -> int:
    """Run ``work`` (printing what it returns) as the owner of the state, or over a
    live owner with ``force`` (see the module docstring); 0 when it ran."""
    from gateway.tproxy.owner import Held, OwnershipError, acquire, mark_forced, probe
    from gateway.tproxy.plan import TproxyError

    command = f"l4gw tproxy {action}"
    try:
        found = probe()
        if found.live and not force:
            raise Held(found.owner, found.netns)
        if found.live:
            if found.owner is None:
                print(f"tproxy {action}: the owner is still starting; try again", file=sys.stderr)
                return EXIT_PROBLEM
            mark_forced(found.owner, f"{command} --force", found.netns)
            for line in work():
                print(line)
            print(
                f"forced: the gateway that owns the state ({found.owner.describe()}) no longer "
                "guards it, and leaves it in place at exit"
            )
            return 0
        ownership = acquire(config, command)
    except Held as exc:
        fix = (
            "stop it (it removes the state as it exits)"
            if action == "teardown"
            else "change [tproxy] in its config and reload it (SIGHUP)"
        )
        print(
            f"tproxy {action}: refused: {exc}; {fix}, or add --force (the gateway then stops "
            "guarding the state and leaves it in place at exit)",
            file=sys.stderr,
        )
        return EXIT_PROBLEM
    except OwnershipError as exc:
        print(f"tproxy {action}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except TproxyError as exc:
        print(f"tproxy {action}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    try:
        for line in work():
            print(line)
    except TproxyError as exc:
        print(f"tproxy {action}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        ownership.release()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.tproxy.plan import TABLE_FAMILY, TABLE_NAME, TproxyError, differences
    from gateway.tproxy.state import status

    config = _config(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        p, state = status(config)
    except TproxyError as exc:
        print(f"tproxy status: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    for line in _owner_lines(config):
        print(line)
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


def _owner_lines(config: Config) -> list[str]:
    """Who owns the state (``owner: ...``) and what its guard last found (``guard: ...``)."""
    from gateway.tproxy.owner import OwnershipError, format_time, probe

    try:
        found = probe()
    except OwnershipError as exc:
        return [f"owner: unknown ({exc})"]
    owner = found.owner
    if not found.live:
        gone = (
            ""
            if owner is None
            else f" (the last one, pid {owner.pid} with {owner.config}, is gone: the next "
            "[tproxy] manage = true start converges from what it left)"
        )
        return [
            f"owner: none: no running gateway owns the TPROXY state of this network namespace{gone}"
        ]
    if owner is None:
        return ["owner: a process that is still starting"]
    if owner.command != "l4gw run":
        return [f"owner: {owner.command} (at work now), {owner.describe()}"]
    other = "" if owner.config == config.path else f" (not {config.path}: compared below)"
    lines = [f"owner: running gateway {owner.describe()}{other}"]
    g = found.guard
    if g is None:
        lines.append("guard: no check yet")
        return lines
    now = time.time()
    if g.get("stood_down"):
        lines.append(f"guard: stood down: {g['stood_down']} took the state over")
        return lines
    if g.get("last_error"):
        found_text = f"FAILED: {g['last_error']}"
    else:
        found_text = "intact" if g.get("intact") else "NOT intact"
    restored = int(g.get("restored", 0))
    if restored:
        found_text += (
            f"; restored {restored} time{'s' if restored != 1 else ''}, last at "
            f"{format_time(float(g.get('last_restored', 0)))} ("
            + "; ".join(g.get("last_differences", []))
            + ")"
        )
    lines.append(
        f"guard: pid {g.get('pid')}, checks every {float(g.get('check_interval', 0)):g}s; "
        f"last check {max(0.0, now - float(g.get('last_check', now))):.1f}s ago: {found_text}"
    )
    return lines


def cmd_doctor(args: argparse.Namespace) -> int:
    from gateway.tproxy.doctor import FAIL, doctor
    from gateway.tproxy.plan import TproxyError

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
