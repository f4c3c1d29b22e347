"""``l4gw accel status``: the relay tiers, loaded or not and why.

A separate process cannot see a running gateway's counters, so the command
reports three things, each from where it is true:

* **probe**: it loads each kernel tier of the policy here and runs the same
  start-up canary the gateway runs (so "would the sockmap tier work on this
  host, with this config, as this user?" has a direct answer);
* **kernel objects**: every BPF program, map and link named ``l4gw*`` in the
  kernel, and which process holds it (a crashed gateway leaves none: the
  kernel frees what no process holds, and nothing is pinned);
* **running gateways**: the status each running gateway publishes once a
  second in ``<status_dir>/<pid>.json`` (flows per tier now and in total,
  kernel-path bytes, held bytes and holds, aborts, self-test results).

Exit status: 0 when every kernel tier the policy lists is usable here, 1 when
one is not (flows would use the next tier), 2 when the config is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.cli.common import help_without_action
from gateway.config import ConfigError
from gateway.plugin_manager import PluginError
from gateway.relay import libbpf
from gateway.relay.copy import loop_report as copy_loop_report
from gateway.relay.policy import KERNEL_TIERS, Policy, defaults, setting
from gateway.relay.probe import pid_alive, probe

EXIT_UNUSABLE = 1
EXIT_CONFIG = 2


def register(subparsers: Any) -> None:
    """Add ``accel`` (with ``status``) to the ``l4gw`` command."""
    accel = subparsers.add_parser(
        "accel",
        help="kernel relay tiers (splice, sockmap): status",
        description="Kernel relay tiers (splice, sockmap).",
    )
    actions = accel.add_subparsers(metavar="ACTION")
    status = actions.add_parser(
        "status",
        help="which tiers work here and why not; what running gateways report",
        description="Load and self-test each kernel tier of the policy in this process, "
        "list the l4gw BPF objects in the kernel, and show the status that running "
        "gateways publish. Exit 0: every listed tier usable; 1: one is not; 2: bad config.",
    )
    status.add_argument("-c", "--config", help="TOML configuration file (default: defaults)")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(func=cmd_status)
    help_without_action(accel)


def _section(path: str | None) -> tuple[Mapping[str, Any], bool]:
    """The ``[plugin.relay]`` section (defaults without a file) and whether the relay
    plugin is loaded at all."""
    if path is None:
        return defaults(), True
    from gateway.cli.common import load_config

    config, plugins = load_config(path)
    loaded = any(info.name == "relay" for info in plugins.infos)
    return config.plugin("relay"), loaded


def _owners() -> dict[tuple[str, int], list[int]]:
    """(kind, id) of BPF objects → pids holding an fd of them, from /proc/*/fdinfo."""
    out: dict[tuple[str, int], list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            entries = list((proc / "fdinfo").iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                text = entry.read_text()
            except OSError:
                continue
            # A link's fdinfo also names its program and map: count only the link.
            wanted = ("link_id",) if "link_id:" in text else ("prog_id", "map_id")
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in wanted:
                    pids = out.setdefault((key.removesuffix("_id"), int(value)), [])
                    if int(proc.name) not in pids:
                        pids.append(int(proc.name))
    return out


def kernel_objects() -> list[dict[str, Any]]:
    """The ``l4gw*`` BPF programs and maps, and links to those programs, with holders.

    Raises:
        libbpf.BpfError: Without CAP_SYS_ADMIN (EPERM), or no libbpf.
    """
    progs = [o for o in libbpf.kernel_objects("prog") if o.name.startswith("l4gw")]
    maps = [o for o in libbpf.kernel_objects("map") if o.name.startswith("l4gw")]
    prog_ids = {o.id for o in progs}
    links = [o for o in libbpf.kernel_objects("link") if o.prog_id in prog_ids]
    owners = _owners()
    return [
        {"kind": o.kind, "id": o.id, "name": o.name, "pid": pid}
        for o in (*progs, *maps, *links)
        for pid in (owners.get((o.kind, o.id)) or [0])
    ]


def running_gateways(status_dir: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Status documents of live gateways, and the files of dead ones."""
    live: list[dict[str, Any]] = []
    stale: list[str] = []
    directory = Path(status_dir)
    if not status_dir or not directory.is_dir():
        return live, stale
    for path in sorted(directory.glob("*.json")):
        if not path.stem.isdigit():
            continue
        if not pid_alive(int(path.stem)):
            stale.append(str(path))
            continue
        try:
            live.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return live, stale


def cmd_status(args: argparse.Namespace) -> int:
    try:
        section, loaded = _section(args.config)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_CONFIG
    except PluginError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    policy = Policy.from_section(section)
    doc: dict[str, Any] = {
        "config": args.config,
        "plugin_loaded": loaded,
        "policy": {
            "tiers": list(policy.tiers),
            "promote_after_bytes": policy.after_bytes,
            "promote_after": policy.after_seconds,
        },
    }
    # Listed before probing, so the probe's own objects (freed asynchronously) are
    # not reported.
    try:
        doc["kernel_objects"] = kernel_objects()
    except libbpf.BpfError as exc:
        doc["kernel_objects"] = []
        doc["kernel_objects_error"] = f"cannot list BPF objects: {exc.strerror}"
    probes: dict[str, Any] = {}
    usable = True
    for tier in KERNEL_TIERS:
        listed = tier in policy.tiers
        result = probe(tier, section)
        if result.accelerator is not None:
            result.accelerator.close()
        probes[tier] = {
            "listed": listed,
            "usable": result.error is None,
            "error": result.error,
            "seconds": round(result.seconds, 3),
        }
        usable = usable and (result.error is None or not listed)
    doc["probe"] = probes
    doc["copy_loop"] = copy_loop_report()
    status_dir = str(setting(section, "status_dir"))
    doc["status_dir"] = status_dir
    doc["gateways"], doc["stale_status_files"] = running_gateways(status_dir)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(render(doc))
    return 0 if usable else EXIT_UNUSABLE


# --- text ------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def render(doc: Mapping[str, Any]) -> str:
    """The human-readable report of :func:`cmd_status`'s document."""
    p = doc["policy"]
    out = [
        f"l4gw relay tiers (config: {doc['config'] or 'defaults'})",
        f"policy: {' > '.join(p['tiers'])}; promote after {_size(p['promote_after_bytes'])} "
        f"or {p['promote_after']:g}s",
    ]
    if not doc["plugin_loaded"]:
        out.append("the relay plugin is disabled ([gateway] disable_plugins): flows use copy")
    out += ["", "probe (loaded and self-tested by this command):"]
    for tier, r in doc["probe"].items():
        verdict = "usable" if r["usable"] else "NOT usable"
        what = f"self-test passed in {r['seconds']:.2f} s" if r["usable"] else r["error"]
        note = "" if r["listed"] else " (not in tiers)"
        out.append(f"  {tier:<8}  {verdict:<10}  {what}{note}")
    out.append(f"  {'copy':<8}  {'usable':<10}  always ({doc['copy_loop']})")
    out += ["", "BPF objects named l4gw* in the kernel:"]
    if doc.get("kernel_objects_error"):
        out.append(f"  {doc['kernel_objects_error']}")
    elif not doc["kernel_objects"]:
        out.append("  none")
    for o in doc["kernel_objects"]:
        holder = f"held by pid {o['pid']}" if o["pid"] else "held by no process (being freed)"
        out.append(f"  {o['kind']:<4} {o['id']:>6}  {o['name']:<16}  {holder}")
    out += ["", f"running gateways (status files in {doc['status_dir'] or '(none)'}):"]
    if not doc["gateways"]:
        out.append("  none")
    for g in doc["gateways"]:
        age = time.time() - g["updated"]
        out.append(f"  pid {g['pid']}  config {g['config']}  status {age:.1f} s old")
        out.append(f"    {'tier':<8} {'enabled':<8} {'now':>5} {'total':>7} {'bytes':>11}  why not")
        for tier, t in g["tiers"].items():
            enabled = "yes" if t["enabled"] else "no"
            out.append(
                f"    {tier:<8} {enabled:<8} {t['flows_now']:>5} {t['flows_total']:>7} "
                f"{_size(t['bytes']):>11}  {t['why_not'] or ''}"
            )
        line = f"    promotions {g['promotions']}, sockmap fallbacks {g['fallbacks']}"
        acc = g["tiers"].get("sockmap", {}).get("accelerator")
        if acc:
            line += (
                f"; sockmap kernel bytes {_size(acc['kernel_bytes'])}, held "
                f"{_size(acc['held_bytes'])} in {acc['holds']} holds, "
                f"aborts {acc['aborts']}, arm failures {acc['arm_failures']}, max backlog "
                f"{_size(acc['max_backlog'])}, counter mismatches {acc['counter_mismatches']}"
            )
        out.append(line)
    for path in doc["stale_status_files"]:
        out.append(f"  stale: {path} (its gateway is gone; the next start removes it)")
    return "\n".join(out)
