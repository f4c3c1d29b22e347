"""The processes a benchmark run starts: backends, proxies, and their cleanup.

Rules kept here:

* Everything listens on 127.0.0.1 only, on ports the kernel picked free.
* Every child is started in its own session (so a Ctrl-C at the terminal
  reaches only the benchmark, which then stops the children in order) and is
  registered in a :class:`Children` that terminates, then kills, each of
  them, whatever happened.
* Readiness is the listening socket in ``/proc/net/tcp``, not a probe
  connection: a probe through a proxy would reach iperf3's server and
  disturb its control protocol.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
_TCP_LISTEN = "0A"


class Children:
    """The child processes of one run; :meth:`stop_all` is safe to call twice."""

    def __init__(self, workdir: Path, wrapper: Sequence[str] = ()) -> None:
        """``wrapper``: a command every child runs under (e.g. valgrind); a wrapped
        child gets 20× the time to listen."""
        self.workdir = workdir
        self.wrapper = tuple(wrapper)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        """Start ``argv`` with stdout and stderr in ``<workdir>/<name>.log``."""
        log_path = self.workdir / f"{name}.log"
        argv = [*self.wrapper, *argv]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **env} if env else None,
                start_new_session=True,
            )
        self.procs.append((name, proc))
        return Child(name, proc, log_path, 20.0 if self.wrapper else 1.0)

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM every live child, then SIGKILL what is left after ``timeout``."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.procs):
            _wait_or_kill(proc, deadline - time.monotonic())
        self.procs.clear()

    def stop(self, child: Child, timeout: float = 5.0) -> None:
        """SIGTERM ``child``, SIGKILL it after ``timeout``; it is no longer tracked."""
        self.procs = [(n, p) for n, p in self.procs if p is not child.proc]
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
        _wait_or_kill(child.proc, timeout)


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``proc`` to exit, then SIGKILL it."""
    try:
        proc.wait(max(0.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Child:
    """One started process and its log."""

    def __init__(
        self, name: str, proc: subprocess.Popen[bytes], log_path: Path, slowdown: float = 1.0
    ) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.slowdown = slowdown

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        """Raise with the log's tail when the process has exited."""
        if self.proc.poll() is not None:
            tail = self.log()[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its reaped children so far."""
        user, system = self.cpu_times()
        return user + system

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the process and its reaped children so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0, 0.0
        # Fields 14-17 of proc(5): utime stime cutime cstime (index 0 here is field 3).
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        tick = os.sysconf("SC_CLK_TCK")
        return (utime + cutime) / tick, (stime + cstime) / tick

    def wait_listening(self, ports: Sequence[int], timeout: float = 15.0) -> None:
        """Wait until every port in ``ports`` has a listening socket on 127.0.0.1."""
        deadline = time.monotonic() + timeout * self.slowdown
        while True:
            self.check_alive()
            if set(ports) <= listening_ports():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {list(ports)} not listening:\n{self.log()}")
            time.sleep(0.02)


def listening_ports() -> set[int]:
    """Ports with a TCP listener bound to 127.0.0.1 or 0.0.0.0 (IPv4)."""
    ports: set[int] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, state = parts[1], parts[3]
        host, port = local.split(":")
        if state == _TCP_LISTEN and host in ("0100007F", "00000000"):
            ports.add(int(port, 16))
    return ports


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP listening sockets on 127.0.0.1:``port`` or 0.0.0.0:``port``
    (several with SO_REUSEPORT: one per process sharing the port)."""
    inodes: set[int] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        host, hexport = parts[1].split(":")
        if (
            parts[3] == _TCP_LISTEN
            and host in ("0100007F", "00000000")
            and int(hexport, 16) == port
        ):
            inodes.add(int(parts[9]))
    return inodes


# --- process facts (/proc) ------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (a supervisor's workers, a gateway's exporter)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def rss_kib(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (``VmRSS``), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def fd_count(pid: int) -> int | None:
    """Open file descriptors of ``pid``, None when it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds (empty when it is gone)."""
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine was busy since boot, all CPUs: user, nice, system,
    irq and softirq time (``/proc/stat``; not idle, iowait or steal). That includes the
    client and the backend, and the kernel threads :func:`kernel_threads_seconds` counts.
    """
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def kernel_threads_ticks() -> dict[int, int]:
    """CPU clock ticks of each kernel thread (a child of ``kthreadd``: kworkers,
    ksoftirqd) so far, by pid: work done on a proxy's behalf that its own CPU time does
    not show, as the sockmap tier's redirects, which run in kworkers."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[1] == "2":  # ppid: kthreadd
            out[int(name)] = int(stat[11]) + int(stat[12])
    return out


def kernel_threads_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds kernel threads spent between two :func:`kernel_threads_ticks`: a
    thread that started since counts from zero, one that exited takes its share with it
    (so this is a lower bound), and a pid reused by a new thread counts from zero."""
    ticks = 0
    for pid, now in after.items():
        then = before.get(pid, 0)
        ticks += now - then if now >= then else now
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


# --- backends ----------------------------------------------------------------


def nginx_config(workdir: Path, port: int) -> str:
    """One worker returning a small static 200 on ``/``; every file in ``workdir``."""
    return f"""
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    # nginx closes a keepalive connection after 1000 requests by default,
    # which would turn the keepalive load into a partly reconnecting one.
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {{
        listen {LOOPBACK}:{port} reuseport backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "hello from the bench backend\\n";
        }}
    }}
}}
"""


def start_nginx(children: Children, port: int) -> Child:
    cfg = children.workdir / "nginx.conf"
    cfg.write_text(nginx_config(children.workdir, port))
    child = children.start("nginx", ["nginx", "-c", str(cfg), "-p", str(children.workdir)])
    child.wait_listening([port])
    return child


def start_iperf3_server(children: Children, port: int) -> Child:
    child = children.start("iperf3-server", ["iperf3", "-s", "-B", LOOPBACK, "-p", str(port)])
    child.wait_listening([port])
    return child


# --- proxies -----------------------------------------------------------------


def third_party_plugins() -> list[str]:
    """Installed ``l4gw.plugins`` entry points that l4gw itself does not ship.

    The development venv installs the example plugins (examples/plugin-*) so that the
    tests load them by entry point; a deployment of l4gw has only the built-in ones,
    so the benchmarks disable the others ("l4gw default" is the product as shipped).
    """
    return sorted(
        ep.name
        for ep in entry_points(group="l4gw.plugins")
        if ep.dist is None or ep.dist.name != "l4gw"
    )


_DISABLE_LINE = re.compile(r"^disable_plugins\s*=.*$", re.MULTILINE)


def disabling_third_party(extra: str = "") -> str:
    """``extra`` ([gateway] lines) with :func:`third_party_plugins` disabled as well."""
    others = third_party_plugins()
    if not others:
        return extra
    line = _DISABLE_LINE.search(extra)
    given = tomllib.loads(line.group(0))["disable_plugins"] if line else []
    merged = "disable_plugins = " + json.dumps(sorted({*given, *others}))
    return _DISABLE_LINE.sub(merged, extra) if line else f"{merged}\n{extra}"


def gateway_config(routes: dict[str, tuple[int, int]], extra: str = "") -> str:
    """An ``l4gw`` config: one listener and one single-endpoint cluster per route.

    Args:
        routes: ``{name: (listen_port, backend_port)}``.
        extra: lines added to the ``[gateway]`` table; :func:`third_party_plugins`
            are added to a ``disable_plugins`` line of theirs, or disabled alone.
    """
    extra = disabling_third_party(extra)
    parts = [f'[gateway]\ndrain_timeout = "1s"\nlog_level = "warning"\n{extra}\n']
    for name, (listen, backend) in routes.items():
        parts.append(
            f"""
[[listener]]
name = "{name}"
bind = "{LOOPBACK}:{listen}"
max_connections = 20000

[[route]]
listener = "{name}"
cluster = "{name}"

[cluster.{name}]
endpoints = ["{LOOPBACK}:{backend}"]
connect_timeout = "2s"
idle_timeout = "60s"
"""
        )
    return "".join(parts)


@dataclass(frozen=True)
class GatewaySource:
    """What an A/B path ``gw-LABEL`` runs: a copy of a tree (None: the working tree's)
    and the interpreter that runs it."""

    tree: Path | None
    python: str = sys.executable

    def __str__(self) -> str:
        return str(self.tree) if self.tree else f"this tree run by {self.python}"

    def argv(self) -> list[str]:
        """``l4gw`` as a command line: ``PYTHON -m gateway.cli``."""
        return [self.python, "-m", "gateway.cli"]

    def env(self) -> dict[str, str] | None:
        """The child's environment additions: the tree copy on the path."""
        return {"PYTHONPATH": str(self.tree)} if self.tree else None


THIS_TREE = GatewaySource(None)


def gateway_sources(specs: Sequence[str]) -> dict[str, GatewaySource]:
    """``--gateway-src LABEL=DIR`` or ``LABEL=PYTHON`` options as paths ``gw-LABEL``.

    DIR is a copy of a tree (its ``gateway`` and ``l4gw_plugins``): A/B a code change.
    PYTHON is an interpreter (an executable file, e.g. another venv's ``bin/python``
    with l4gw's dependencies installed) that runs this tree: A/B an interpreter.

    Raises:
        ValueError: a spec that is neither (the message names it).
    """
    sources = {}
    for spec in specs:
        label, _, src = spec.partition("=")
        path = Path(src)
        gw = path / "gateway"
        if label and path.is_file() and os.access(path, os.X_OK):
            sources[f"gw-{label}"] = GatewaySource(None, str(path))
            continue
        # cli.py: trees from before the command became a package
        if not label or not ((gw / "cli" / "main.py").is_file() or (gw / "cli.py").is_file()):
            raise ValueError(
                f"--gateway-src {spec!r}: want LABEL=DIR with DIR/gateway/cli/main.py, "
                "or LABEL=PYTHON (an interpreter)"
            )
        sources[f"gw-{label}"] = GatewaySource(path.resolve())
    return sources


def start_gateway(
    children: Children,
    name: str,
    routes: dict[str, tuple[int, int]],
    extra: str = "",
    reuseport: bool = False,
    src: GatewaySource = THIS_TREE,
) -> Child:
    """A real ``l4gw run -c FILE``.

    Args:
        reuseport: through the bench's SO_REUSEPORT wrapper, so that several
            processes can share the ports.
        src: run another tree's ``gateway`` and ``l4gw_plugins`` packages, or run
            this tree by another interpreter (:func:`gateway_sources`).
    """
    cfg = children.workdir / f"{name}.toml"
    cfg.write_text(gateway_config(routes, extra))
    if reuseport:
        argv = [src.python, str(Path(__file__).with_name("reuseport_gateway.py"))]
    else:
        argv = src.argv()
    child = children.start(
        name, [*argv, "run", "-c", str(cfg)], cwd=src.tree or ROOT, env=src.env()
    )
    child.wait_listening([listen for listen, _ in routes.values()])
    return child


def haproxy_config(
    routes: dict[str, tuple[int, int]],
    nbthread: int | None,
    splice: bool = False,
    maxconn: int = 8000,
) -> str:
    """HAProxy in ``mode tcp``: one frontend/backend pair per route.

    Args:
        routes: ``{name: (listen_port, backend_port)}``.
        nbthread: threads; None keeps HAProxy's default (one per CPU it may
            run on, since 2.5).
        splice: ``option splice-auto``: HAProxy moves payload with splice(2)
            through pipes when it expects a large transfer (its own kernel tier).
        maxconn: HAProxy's connection cap (it needs two descriptors per connection
            under the 20,000 hard limit here).
    """
    threads = f"    nbthread {nbthread}\n" if nbthread else ""
    out = [
        "global\n"
        f"{threads}"
        f"    maxconn {maxconn}\n" + ("    maxpipes 1024\n" if splice else "") + "defaults\n"
        # Pipes take fds too: HAProxy's default (maxconn / 4) would not fit the limit.
        "    mode tcp\n"
        "    timeout connect 2s\n"
        "    timeout client 60s\n"
        "    timeout server 60s\n" + ("    option splice-auto\n" if splice else "")
    ]
    for name, (listen, backend) in routes.items():
        out.append(
            f"frontend fe_{name}\n"
            f"    bind {LOOPBACK}:{listen}\n"
            f"    default_backend be_{name}\n"
            f"backend be_{name}\n"
            f"    server s1 {LOOPBACK}:{backend}\n"
        )
    return "".join(out)


def start_haproxy(
    children: Children,
    name: str,
    routes: dict[str, tuple[int, int]],
    nbthread: int | None,
    splice: bool = False,
    maxconn: int = 8000,
) -> Child:
    cfg = children.workdir / f"{name}.cfg"
    cfg.write_text(haproxy_config(routes, nbthread, splice, maxconn))
    # -db: stay in the foreground without a master process, so SIGTERM ends it.
    child = children.start(name, ["haproxy", "-f", str(cfg), "-db"])
    child.wait_listening([listen for listen, _ in routes.values()])
    return child


REFERENCE_PROXIES = {
    "uvloop": ("uvloop_proxy.py",),
    "trio-lean": ("trio_proxy.py", "lean"),
    "trio-naive": ("trio_proxy.py", "naive"),
}
"""Reference proxies by path name: a script of bench/ and its first arguments."""


def start_reference_proxy(
    children: Children, name: str, routes: dict[str, tuple[int, int]]
) -> Child:
    """One of :data:`REFERENCE_PROXIES` (bench/uvloop_proxy.py, the asyncio+uvloop
    proxy; bench/trio_proxy.py lean or naive), one process."""
    script, *args = REFERENCE_PROXIES[name]
    argv = [sys.executable, str(Path(__file__).with_name(script)), *args]
    for listen, backend in routes.values():
        argv += [str(listen), str(backend)]
    child = children.start(name, argv)
    child.wait_listening([listen for listen, _ in routes.values()])
    return child
