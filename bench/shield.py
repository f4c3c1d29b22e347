#!/usr/bin/env python3
"""Benchmark the eBPF shield: a normal client's new connections under a flood.

One run builds two network namespaces joined by a veth pair (client side
198.18.0.0/24, gateway 198.18.0.1), starts a backend that accepts and closes,
and runs ``l4gw run`` twice, with the same limiter::

    [plugin.ratelimit]
    per_client = { rate = 200, per = "1s", burst = 200 }
    shield_after = { refusals = 20, per = "10s", ttl = "5m" }

* ``shield``: with ``[shield] interfaces = ["gw-cli"]``: once the flooder
  crosses ``shield_after`` the kernel drops its SYNs at the veth's ingress;
* ``userspace``: without ``[shield]``: the same verdict is enforced in
  ``l4gw_admit`` (an accept, a task and a refusal per flood connection), which
  is all a userspace limiter can do.

In each mode: the normal client alone (``unloaded``), then while the flooder
runs (``loaded``), then alone again a second after the flood
(``unloaded_after``; "alone" is the mean of the two, so that drift of a shared
machine lands on both sides). The flooder (198.18.0.2, one process, one
core) opens as many connections as it can: non-blocking connects, up to
``--inflight`` at once, on a CPU of its own (the last one; the gateway, the
backend and the normal client share the others), each closed (RST) as soon as it connects or after
20 ms without a SYN-ACK. The normal client (sources rotating over
198.18.0.16/28, so that its own buckets never refuse it) opens one connection at a time, reads to the
backend's EOF and closes. The result per mode is the normal client's loaded
rate as a fraction of its rate alone (target with the shield: >= 0.9), with
the CPU seconds the gateway spent in each phase (``/proc/PID/stat``) and what the
flooder managed (attempts, handshakes completed).

Numbers on a shared 2-vCPU VM are noisy; ratios within a run are what to read.
Needs root (namespaces, BPF). Every child is bounded in time; the namespaces
are removed at the end, whatever happened.

    .venv/bin/python bench/shield.py                 # 5 s phases
    .venv/bin/python bench/shield.py --quick         # 1 s phases (smoke)
    .venv/bin/python bench/shield.py --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from script import write_report

GATEWAY = "198.18.0.1"
FLOODER = "198.18.0.2"
NORMAL = [f"198.18.0.{i}" for i in range(16, 32)]
PORT, BACKEND_PORT, ADMIN_PORT = 8443, 9000, 9901
MODES = ("shield", "userspace")
CLONE_NEWNET = 0x40000000  # linux/sched.h
_LINGER0 = struct.pack("ii", 1, 0)
WARM_UP = 0.3
"""Seconds the normal client connects before it starts counting."""
GIVE_UP = 0.02
"""The flooder closes a connection not established after this long (a dropped SYN):
short, so that the shield does not slow the flooder down by making it wait."""


# --- roles: this file runs as each child process -------------------------------------------


def role_backend(port: int) -> None:
    """Accept and close at once (the client reads EOF)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4096)
    while True:
        conn, _ = srv.accept()
        conn.close()


def role_normal(seconds: float) -> dict[str, Any]:
    """One connection at a time for ``seconds``: connect, read to EOF, close."""
    done = failed = 0
    warm_until = time.monotonic() + WARM_UP
    end = warm_until + seconds
    i = 0
    while (now := time.monotonic()) < end:
        if now < warm_until:
            done = failed = 0
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        sock.settimeout(2.0)
        try:
            sock.bind((NORMAL[i % len(NORMAL)], 0))
            sock.connect((GATEWAY, PORT))
            while sock.recv(4096):
                pass
            done += 1
        except OSError:
            failed += 1
        finally:
            sock.close()
        i += 1
    return {"connections": done, "failed": failed, "per_second": done / seconds}


def role_flood(seconds: float, inflight: int) -> dict[str, Any]:
    """As many new connections as one core makes, for ``seconds``."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}
    attempts = connected = 0
    end = time.monotonic() + seconds

    def drop(sock: socket.socket) -> None:
        sel.unregister(sock)
        del pending[sock]
        sock.close()  # SO_LINGER 0: an RST, no TIME_WAIT

    while (now := time.monotonic()) < end:
        while len(pending) < inflight:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            sock.setblocking(False)
            sock.bind((FLOODER, 0))
            code = sock.connect_ex((GATEWAY, PORT))
            attempts += 1
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                continue
            pending[sock] = now
            sel.register(sock, selectors.EVENT_WRITE)
        for key, _ in sel.select(0.01):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
            drop(sock)
        for sock, started in list(pending.items()):
            if now - started > GIVE_UP:
                drop(sock)
    for sock in list(pending):
        drop(sock)
    return {"attempts": attempts, "connected": connected, "per_second": attempts / seconds}


# --- the run ---------------------------------------------------------------------------------


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    tag = f"l4gwbench-{os.getpid()}"
    cli, gw = f"{tag}-cli", f"{tag}-gw"
    try:
        ip("netns", "add", cli)
        ip("netns", "add", gw)
        ip("link", "add", "cli0", "netns", cli, "type", "veth", "peer", "gw-cli", "netns", gw)
        ip("-n", gw, "addr", "add", f"{GATEWAY}/24", "dev", "gw-cli")
        for address in (FLOODER, *NORMAL):
            ip("-n", cli, "addr", "add", f"{address}/24", "dev", "cli0")
        for ns, dev in ((cli, "cli0"), (gw, "gw-cli")):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        yield cli, gw
    finally:
        for ns in (cli, gw):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def child(ns: str, *args: str, timeout: float) -> dict[str, Any]:
    """Run this file as a role in ``ns``; its JSON result."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def start_child(ns: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        text=True,
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_config(mode: str) -> str:
    shield = '\n[shield]\ninterfaces = ["gw-cli"]\nmode = "tc"\n' if mode == "shield" else ""
    return f"""
[[listener]]
name = "web"
bind = "{GATEWAY}:{PORT}"

[[route]]
listener = "web"
cluster = "be"

[cluster.be]
endpoints = ["127.0.0.1:{BACKEND_PORT}"]

[plugin.ratelimit]
per_client = {{ rate = 200, per = "1s", burst = 200 }}
shield_after = {{ refusals = 20, per = "10s", ttl = "5m" }}

[admin]
bind = "127.0.0.1:{ADMIN_PORT}"
{shield}"""


def admin_get(ns: str, path: str) -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as there:
        libc.setns(there.fileno(), CLONE_NEWNET)
        try:
            sock = socket.create_connection(("127.0.0.1", ADMIN_PORT), timeout=5)
        finally:
            libc.setns(home.fileno(), CLONE_NEWNET)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def run_mode(
    mode: str, cli: str, gw_ns: str, seconds: float, inflight: int, cpus: tuple[str, str]
) -> dict[str, Any]:
    from gateway.testing import GatewayProcess

    timeout = seconds + 30
    with GatewayProcess(
        gateway_config(mode),
        name=f"gw-{mode}",
        prefix=["ip", "netns", "exec", gw_ns, "taskset", "-c", cpus[1]],
    ) as gw:
        assert gw.proc is not None
        pid = gw.proc.pid  # ip netns exec and taskset exec l4gw: the same process
        normal = ("--role", "normal", "--seconds", str(seconds), "--cpus", cpus[1])
        cpu0 = cpu_seconds(pid)
        unloaded = child(cli, *normal, timeout=timeout)
        cpu1 = cpu_seconds(pid)
        flood = start_child(
            cli,
            *("--role", "flood", "--seconds", str(seconds + 1.5), "--inflight", str(inflight)),
            *("--cpus", cpus[0]),
        )
        time.sleep(1.0)  # the flooder crosses shield_after
        cpu2 = cpu_seconds(pid)
        loaded = child(cli, *normal, timeout=timeout)
        cpu3 = cpu_seconds(pid)
        out, _ = flood.communicate(timeout=timeout)
        flooded = json.loads(out)
        time.sleep(1.0)  # what the flood left in the accept queue is refused meanwhile
        after = child(cli, *normal, timeout=timeout)
        entries = admin_get(gw_ns, "/shield")["entries"]
        status = admin_get(gw_ns, "/status")["shield"]
    listed = [e for e in entries if e["cidr"] == f"{FLOODER}/32"]
    alone = (unloaded["per_second"] + after["per_second"]) / 2
    fraction = loaded["per_second"] / alone if alone else 0.0
    return {
        "normal_unloaded": unloaded,
        "normal_loaded": loaded,
        "normal_unloaded_after": after,
        "normal_alone_per_second": round(alone, 1),
        "fraction": round(fraction, 3),
        "flood": flooded,
        "flooder_listed": bool(listed),
        "flooder_drops": listed[0]["drops"] if listed else 0,
        "kernel": status["kernel"],
        "gateway_cpu_seconds": {
            "unloaded": round(cpu1 - cpu0, 3),
            "loaded": round(cpu3 - cpu2, 3),
        },
    }


def cpu_split() -> tuple[str, str]:
    """(CPUs of the flooder, CPUs of everything else): the flooder gets one core of
    its own when there are two or more, so that what it costs the others is the
    gateway's work, not a fight for its core."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        text = ",".join(map(str, cpus))
        return text, text
    return str(cpus[-1]), ",".join(map(str, cpus[:-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("backend", "normal", "flood"))
    parser.add_argument("--cpus", help="a role runs on these CPUs (comma-separated)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="1 s phases (smoke)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    if args.role == "backend":
        role_backend(BACKEND_PORT)
        return 0
    if args.role == "normal":
        print(json.dumps(role_normal(args.seconds)))
        return 0
    if args.role == "flood":
        print(json.dumps(role_flood(args.seconds, args.inflight)))
        return 0
    if os.geteuid() != 0:
        print("bench/shield.py needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    seconds = 1.0 if args.quick else args.seconds
    report: dict[str, Any] = {"seconds": seconds, "inflight": args.inflight, "modes": {}}
    with namespaces() as (cli, gw_ns):
        cpus = cpu_split()
        report["cpus"] = {"flooder": cpus[0], "others": cpus[1]}
        backend = start_child(gw_ns, "--role", "backend", "--cpus", cpus[1])
        try:
            time.sleep(0.3)
            for mode in MODES:
                report["modes"][mode] = run_mode(mode, cli, gw_ns, seconds, args.inflight, cpus)
        finally:
            backend.kill()
            backend.wait(timeout=10)
    for mode, r in report["modes"].items():
        print(
            f"{mode:>9}: normal client {r['normal_loaded']['per_second']:.0f}/s under flood vs "
            f"{r['normal_alone_per_second']:.0f}/s alone = {r['fraction']:.0%}; "
            f"flooder {r['flood']['per_second']:.0f} attempts/s, "
            f"{r['flood']['connected']} handshakes completed, "
            f"kernel drops {r['flooder_drops']}; gateway CPU "
            f"{r['gateway_cpu_seconds']['unloaded']}s alone, "
            f"{r['gateway_cpu_seconds']['loaded']}s under flood"
        )
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
