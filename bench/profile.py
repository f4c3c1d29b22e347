#!/usr/bin/env python3
"""Profile one gateway process under one load: where does its CPU time go?

Starts the backend the load needs and one ``l4gw run``, runs the load
(bench/loads.py) against the gateway while a profiler watches it, and prints
the functions with the most samples, self and inclusive.

    .venv/bin/python bench/profile.py --load wrk-close            # py-spy
    .venv/bin/python bench/profile.py --load wrk-close --cprofile  # call counts

py-spy (``.venv/bin/pip install py-spy``; a tool, not a dependency of l4gw)
samples from outside the process and barely slows it; ``--native`` adds the
C frames (the socket calls). cProfile runs inside the gateway, slows it
several-fold, but counts calls: divide by the requests served for "calls per
connection".
"""

from __future__ import annotations

import argparse
import collections
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import LOADS, run_load
from peers import (
    ROOT,
    Children,
    free_port,
    gateway_config,
    start_gateway,
    start_iperf3_server,
    start_nginx,
)

_LINENO = re.compile(r":\d+\)$")
_OWN = re.compile(r"\((?:\S*/)?(?:gateway|plugins|l4gw_plugins)/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", default="wrk-close", choices=sorted(LOADS))
    p.add_argument("--seconds", type=float, default=10.0, help="load duration (10)")
    p.add_argument("--cprofile", action="store_true", help="cProfile instead of py-spy")
    p.add_argument("--native", action="store_true", help="py-spy: include C frames")
    p.add_argument("--idle", action="store_true", help="py-spy: include idle (epoll) samples")
    p.add_argument("--top", type=int, default=30, help="rows per table (30)")
    p.add_argument("--gateway-extra", default="", help="TOML lines for the [gateway] table")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (profiles, logs)")
    args = p.parse_args(argv)
    load = LOADS[args.load]
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not args.cprofile and not Path(pyspy).exists():
        print("profile: py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="l4gw-profile-"))
    children = Children(workdir)
    try:
        backend = free_port()
        if load.backend == "iperf":
            start_iperf3_server(children, backend)
        else:
            start_nginx(children, backend)
        listen = free_port()
        routes = {load.backend: (listen, backend)}
        if args.cprofile:
            cfg = workdir / "gw.toml"
            cfg.write_text(gateway_config(routes, args.gateway_extra))
            prof = workdir / "gw.prof"
            cprofile = [sys.executable, "-m", "cProfile", "-o", str(prof)]
            gw = children.start(
                "gw", [*cprofile, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=ROOT
            )
            gw.wait_listening([listen])
        else:
            gw = start_gateway(children, "gw", routes, args.gateway_extra)
            raw = workdir / "gw.pyspy.txt"
            spy_argv = [pyspy, "record", "-p", str(gw.pid), "-f", "raw", "-o", str(raw)]
            spy_argv += ["-d", str(int(args.seconds) + 1)]
            # Native stacks need the process paused per sample: sample less often.
            spy_argv += ["-r", "100", "--native"] if args.native else ["-r", "250", "--nonblocking"]
            spy_argv += ["--idle"] if args.idle else []
            spy = subprocess.Popen(
                spy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            time.sleep(0.5)  # py-spy attaches; samples before the load are idle anyway
        cpu0 = gw.cpu_seconds()
        metrics = run_load(load, listen, args.seconds)
        cpu = gw.cpu_seconds() - cpu0
        served = metrics.get("requests", 0.0)
        print(f"load {load.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        print(
            f"gateway CPU {cpu:.2f}s"
            + (f" = {cpu / served * 1e6:.0f} µs/request" if served else "")
        )
        if args.cprofile:
            children.stop_all(timeout=20)
            _print_cprofile(prof, args.top, served)
        else:
            _, err = spy.communicate(timeout=args.seconds + 30)
            if not raw.exists():
                print(f"profile: py-spy wrote nothing:\n{err}", file=sys.stderr)
                return 1
            _print_pyspy(raw, args.top)
        return 0
    finally:
        children.stop_all()
        if args.keep:
            print(f"profile: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _short(frame: str) -> str:
    frame = _LINENO.sub(")", frame)
    return frame.replace(str(ROOT) + "/", "").replace("site-packages/", "")


_SYSCALLS = frozenset(
    [
        "send",
        "recv",
        "sendto",
        "recvfrom",
        "sendmsg",
        "recvmsg",
        "connect",
        "accept4",
        "close",
        "shutdown",
        "socket",
        "setsockopt",
        "getsockopt",
        "getsockname",
        "getpeername",
        "ioctl",
        "fcntl",
        "splice",
        "pipe2",
        "epoll_wait",
        "epoll_ctl",
        "__GI___close",
        "__libc_send",
        "__libc_recv",
    ]
)
_PY_CATEGORIES = (
    ("gateway/relay/copy.py", "copy relay (Python)"),
    ("gateway/plugin_manager.py", "hook dispatch"),
    ("inspect.py", "hook dispatch"),
    ("gateway/", "core connection path (Python)"),
    ("plugins/", "plugins"),
    ("l4gw_plugins/", "plugins"),
    ("ipaddress.py", "ip_address parsing"),
    ("socket.py", "socket module (Python wrappers)"),
    ("logging/", "logging"),
    ("trio/", "trio runtime (scheduler, cancel scopes, nurseries, epoll bookkeeping)"),
    ("contextlib.py", "trio runtime (scheduler, cancel scopes, nurseries, epoll bookkeeping)"),
    ("outcome/", "trio runtime (scheduler, cancel scopes, nurseries, epoll bookkeeping)"),
    ("<attrs generated", "trio runtime (scheduler, cancel scopes, nurseries, epoll bookkeeping)"),
)


def _category(frames: list[str]) -> str:
    """Where one sample's time goes: a syscall, the GC, or the innermost Python file."""
    if any(f.startswith("gc_collect") for f in frames):
        return "cyclic GC"
    name = frames[-1].split(" (", 1)[0]
    if name in _SYSCALLS:
        return f"syscall {name.removeprefix('__libc_').removeprefix('__GI___')}"
    for frame in reversed(frames):
        if ".py" in frame or "<attrs generated" in frame:
            for needle, category in _PY_CATEGORIES:
                if needle in frame:
                    return category
            return "other Python"
    return "other native"


def _print_pyspy(raw: Path, top: int) -> None:
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        categories[_category(frames)] += n
        self_[_short(frames[-1])] += n
        for frame in set(map(_short, frames)):
            incl[frame] += n
        own = [f for f in frames if _OWN.search(f)]
        if own:
            by_line[own[-1].replace(str(ROOT) + "/", "")] += n
    print(f"\n{total} samples")
    for title, counter in (
        ("by category (innermost frame; syscalls need --native)", categories),
        ("self", self_),
        ("inclusive", incl),
        ("innermost l4gw line (inclusive)", by_line),
    ):
        print(f"\n-- {title} --")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / total:6.1f}%  {frame}")


def _print_cprofile(prof: Path, top: int, served: float) -> None:
    stats = pstats.Stats(str(prof))
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    if served:
        print(f"calls per request (served {served:.0f}):")
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][1])  # type: ignore[attr-defined]
        for (file, line, func), (_, ncalls, *_rest) in rows[:top]:
            print(f"{ncalls / served:8.2f}  {func} ({file}:{line})")


if __name__ == "__main__":
    sys.exit(main())
