"""``l4gw shield``: the running gateway's shield entries, and whether the kernel
shield can load here.

* ``list``, ``add CIDR [--ttl 2m] [--reason TEXT]``, ``del CIDR`` talk to the
  running gateway's admin endpoint (``/shield``, gateway/shield/admin.py), found
  from the config file: ``[admin] bind`` (a wildcard bind is reached on
  loopback) and ``[admin] token``. The gateway does the work, so an add is
  checked against its never-list, logged and counted like any other.
* ``status`` loads the shield program in this process and runs the start-up
  self-test (nothing is attached), says which mode ``[shield] mode`` picks for
  each interface, what is attached to each now, and what the running
  gateway reports, if it answers.

Exit status: 0 done; 1 the gateway refused or could not be reached, or the
kernel shield cannot load here; 2 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gateway.cli.common import help_without_action, load_or_report
from gateway.config import Config
from gateway.schema import format_address

EXIT_FAILED = 1
EXIT_CONFIG = 2
TIMEOUT = 5.0
"""Seconds for one admin request."""


class _Failed(Exception):
    """One line for stderr; exit 1."""


def register(subparsers: Any) -> None:
    """Add ``shield`` (list, add, del, status) to the ``l4gw`` command."""
    shield = subparsers.add_parser(
        "shield",
        help="the eBPF shield: list, add and remove entries; status",
        description="The eBPF shield's entries in the running gateway (through its admin "
        "endpoint), and whether the kernel shield can load here.",
    )
    actions = shield.add_subparsers(metavar="ACTION")

    listing = actions.add_parser("list", help="the entries: CIDR, TTL, drops, reason")
    add = actions.add_parser("add", help="shield a client address or CIDR")
    add.add_argument("cidr", help="an address or CIDR, e.g. 198.51.100.0/24")
    add.add_argument("--ttl", help='how long, e.g. "2m" or 120 (default: no expiry)')
    add.add_argument("--reason", default="", help="why (shown in list and in the log)")
    delete = actions.add_parser("del", help="remove an entry (the CIDR as listed)")
    delete.add_argument("cidr", help="the entry's CIDR")
    status = actions.add_parser(
        "status", help="whether the kernel shield loads here, in which mode; what is attached"
    )
    for p, func in ((listing, cmd_list), (add, cmd_add), (delete, cmd_del), (status, cmd_status)):
        p.add_argument("-c", "--config", required=p is not status, help="TOML configuration file")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.set_defaults(func=func)
    help_without_action(shield)


def _config(path: str) -> Config | None:
    loaded = load_or_report(path)
    return loaded[0] if loaded is not None else None


def admin_url(config: Config, query: str = "") -> str:
    """The ``/shield`` URL of the gateway running ``config``.

    Raises:
        _Failed: the config has no ``[admin]``.
    """
    if config.admin is None:
        raise _Failed(f"{config.path}: no [admin] section: l4gw shield talks to the admin endpoint")
    host = config.admin.host
    if host in ("0.0.0.0", "::"):  # a wildcard bind answers on loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://{format_address(host, config.admin.port)}/shield"
    return f"{url}?{query}" if query else url


def request(config: Config, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``/shield`` request; the JSON answer.

    Raises:
        _Failed: unreachable, or an error status (its ``error`` is the line).
    """
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    url = admin_url(config)
    if config.admin is not None and config.admin.token:
        headers["Authorization"] = f"Bearer {config.admin.token}"
    req = urllib.request.Request(url, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as answer:
            document: dict[str, Any] = json.loads(answer.read())
            return document
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            why = json.loads(text).get("error", text)
        except ValueError:
            why = text.strip() or exc.reason
        raise _Failed(f"the gateway refused ({exc.code}): {why}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Failed(f"cannot reach the gateway at {url}: {reason}") from None


def _run(args: argparse.Namespace, method: str, body: dict[str, Any] | None) -> int:
    config = _config(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        document = request(config, method, body)
    except _Failed as exc:
        print(f"l4gw shield: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(document, indent=2))
    elif "entries" in document:
        print(format_listing(document))
    else:
        for verb in ("added", "removed"):
            if verb in document:
                print(f"{verb}: {format_entries([document[verb]])}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    return _run(args, "GET", None)


def cmd_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"cidr": args.cidr}
    if args.ttl:
        body["ttl"] = args.ttl
    if args.reason:
        body["reason"] = args.reason
    return _run(args, "POST", body)


def cmd_del(args: argparse.Namespace) -> int:
    return _run(args, "DELETE", {"cidr": args.cidr})


def _ttl(seconds: Any) -> str:
    if seconds is None:
        return "never"
    s = float(seconds)
    if s >= 3600:
        return f"{s / 3600:.1f}h"
    if s >= 60:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{s:.1f}s"


def format_entries(entries: list[dict[str, Any]]) -> str:
    """One line per entry: CIDR, expires in, drops, source, reason."""
    lines = [
        f"{e.get('cidr', '?'):<43} expires {_ttl(e.get('expires_in')):>8}  "
        f"drops {e.get('drops', 0):>8}  {e.get('source', '')}: {e.get('reason', '')}"
        for e in entries
    ]
    return "\n".join(lines)


def format_listing(document: dict[str, Any]) -> str:
    """The text of ``l4gw shield list``."""
    kernel = document.get("kernel", {})
    if kernel.get("enabled"):
        head = f"kernel shield: on ({kernel.get('mode', '?')})"
    else:
        head = f"kernel shield: off ({kernel.get('why_off', '?')}); enforced in admit"
    entries = document.get("entries", [])
    body = format_entries(entries) if entries else "no entries"
    return f"{head}\n{body}"


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.shield.attach import driver
    from gateway.shield.kernel import KernelShield, ShieldUnavailable

    config = _config(args.config) if args.config else None
    if args.config and config is None:
        return EXIT_CONFIG
    section = config.shield if config is not None else None
    report: dict[str, Any] = {}
    try:
        with KernelShield.open(16) as shield:
            shield.probe()
        report["loads_here"] = True
    except ShieldUnavailable as exc:
        report["loads_here"] = False
        report["why_not"] = str(exc)
    interfaces: dict[str, Any] = {}
    for name in section.interfaces if section is not None else ():
        interfaces[name] = _interface(name, section.mode if section else "auto", driver(name))
    report["interfaces"] = interfaces
    if config is not None and config.admin is not None:
        try:
            report["gateway"] = request(config, "GET").get("kernel", {})
        except _Failed as exc:
            report["gateway"] = {"unreachable": str(exc)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            "kernel shield: loads here (self-test passed)"
            if report["loads_here"]
            else f"kernel shield: cannot load here: {report['why_not']}"
        )
        for name, info in interfaces.items():
            now = ", ".join(info["attached"]) or "nothing"
            print(f"{name}: {info['picks']}; attached now: {now}")
        if "gateway" in report:
            print(f"running gateway: {json.dumps(report['gateway'])}")
    return 0 if report["loads_here"] else EXIT_FAILED


def _interface(name: str, mode: str, drv: str) -> dict[str, Any]:
    from gateway.relay import libbpf
    from gateway.relay.libbpf import BpfError
    from gateway.shield.attach import TC_HANDLE, TC_PRIORITY

    try:
        ifindex = socket.if_nametoindex(name)
    except OSError:
        return {"picks": "no such interface here", "driver": "", "attached": []}
    if mode == "tc" or (mode == "auto" and drv == "veth"):
        picks = "tc (tcx link)"
    elif mode == "xdp":
        picks = "xdp (native if the driver has it, else generic)"
    else:
        picks = "xdp if the driver has native XDP, else tc"
    attached: list[str] = []
    try:
        xdp = libbpf.xdp_query_id(ifindex, 0)
        if xdp:
            attached.append(f"xdp {libbpf.prog_name(xdp)} (id {xdp})")
        for prog in libbpf.prog_query(ifindex, libbpf.BPF_TCX_INGRESS):
            attached.append(f"tcx {libbpf.prog_name(prog)} (id {prog})")
        tc = libbpf.tc_query(ifindex, TC_HANDLE, TC_PRIORITY)
        if tc is not None:
            attached.append(f"tc filter (netlink) program id {tc}")
    except BpfError as exc:
        attached.append(f"cannot tell: {exc.strerror}")
    return {"picks": picks, "driver": drv or "none", "attached": attached}
