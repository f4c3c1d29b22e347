"""A real DNS server for tests: dnsmasq on a free port, with records the test rewrites.

:class:`Dnsmasq` serves one local domain (``l4gw.test`` by default) from a hosts file
(A and AAAA records) and command-line SRV records, with every answer's TTL set to
``ttl`` (``--local-ttl``). Names inside the domain that it does not hold answer
NXDOMAIN (``--local=/domain/``); names outside it answer REFUSED (no upstream,
``--no-resolv``), and the host's /etc/hosts is not served (``--no-hosts``), so a
name only /etc/hosts knows is one DNS cannot answer.

* :meth:`Dnsmasq.set_hosts` rewrites the hosts file (atomic replace) and sends
  SIGHUP, which re-reads ``--addn-hosts``; it returns once dnsmasq logged the
  re-read, so the next query sees the new records.
* :meth:`Dnsmasq.set_srv` changes SRV records, which live on the command line:
  dnsmasq restarts on the same port.
* :meth:`Dnsmasq.stop` / :meth:`Dnsmasq.start` take the server away and back
  (a query to a stopped server times out: nothing answers on the port).

``netns`` runs it inside a network namespace (``ip netns exec``), listening on
that namespace's own loopback. It runs as root (``--user=root``): dnsmasq
otherwise drops to ``nobody``, who cannot re-read a hosts file under pytest's
private tmp directory on SIGHUP (as another user it stays that user). Every instance is stopped by its pid on
:meth:`stop` (the :func:`dnsmasq` fixture does it even when the test fails).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
DOMAIN = "l4gw.test"


@dataclass(frozen=True)
class Srv:
    """One SRV record: ``name`` points at ``target:port``."""

    name: str
    target: str
    port: int
    priority: int = 10
    weight: int = 10


def free_dns_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (dnsmasq listens on both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as udp, socket.socket(family) as tcp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            try:
                tcp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP")


@dataclass
class Dnsmasq:
    """One dnsmasq process serving ``domain`` (see the module docstring)."""

    workdir: Path
    hosts: dict[str, list[str]] = field(default_factory=dict)
    """Name -> addresses (IPv4 and IPv6), as the hosts file holds them."""
    srv: list[Srv] = field(default_factory=list)
    ttl: int = 1
    domain: str = DOMAIN
    netns: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts_file = self.workdir / "dnsmasq.hosts"
        self.log_file = self.workdir / "dnsmasq.log"
        self._write_hosts()

    @property
    def server(self) -> str:
        """The ``[dns] servers`` item for this instance."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def name(self, label: str) -> str:
        """``label`` inside this instance's domain."""
        return f"{label}.{self.domain}"

    # -- process -----------------------------------------------------------------

    def start(self, timeout: float = 10) -> Dnsmasq:
        """Start (or start again, on the same port) and wait until it has read its records."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._stderr = ""
        fixed = bool(self.port)
        for _ in range(3):
            if not self.port:
                # In a namespace of its own every port is free.
                self.port = 5353 if self.netns else free_dns_port(self.host)
            self._spawn()
            if self._wait_started(timeout):
                return self
            if self.proc is not None and self.proc.poll() is None:
                break
            assert self.proc is not None and self.proc.stderr is not None
            why = self.proc.stderr.read().decode(errors="replace").strip()
            self._stderr += f"(port {self.port}) {why} "
            if fixed:
                time.sleep(0.2)  # a restart keeps its port: wait for the old socket to go
            else:
                # Lost the port to another process between the probe and the bind: pick again.
                self.port = 0
        log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        self.stop()
        raise RuntimeError(f"dnsmasq did not start: {self._stderr}\n{log[-2000:]}")

    def _spawn(self) -> None:
        argv = [
            DNSMASQ,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--pid-file=",
            # As root it would drop to nobody (see the module docstring).
            *(["--user=root"] if os.geteuid() == 0 else []),
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--no-negcache",
            f"--addn-hosts={self.hosts_file}",
            f"--local=/{self.domain}/",
            f"--local-ttl={self.ttl}",
            "--log-queries",
            f"--log-facility={self.log_file}",
            *(f"--srv-host={r.name},{r.target},{r.port},{r.priority},{r.weight}" for r in self.srv),
        ]
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.proc = subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def _wait_started(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if re.search(rf"read {re.escape(str(self.hosts_file))} - \d+ names", self._new_log()):
                return True
            time.sleep(0.02)
        return False

    def _new_log(self) -> str:
        if not self.log_file.exists():
            return ""
        with open(self.log_file, errors="replace") as f:
            f.seek(self._log_offset)
            return f.read()

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL); the port and the records stay for :meth:`start`."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- records -----------------------------------------------------------------

    def _write_hosts(self) -> None:
        lines = [f"{addr} {name}" for name, addrs in self.hosts.items() for addr in addrs]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        os.replace(tmp, self.hosts_file)

    def set_hosts(self, hosts: Mapping[str, Sequence[str]], timeout: float = 10) -> None:
        """Replace the A/AAAA records; returns once a running dnsmasq has re-read them."""
        self.hosts = {name: list(addrs) for name, addrs in hosts.items()}
        self._write_hosts()
        if not self.running:
            return
        assert self.proc is not None
        self._log_offset = self.log_file.stat().st_size
        # ip netns exec runs dnsmasq as its child's exec: the pid is dnsmasq's own.
        os.kill(self.proc.pid, signal.SIGHUP)
        if not self._wait_started(timeout):
            raise RuntimeError("dnsmasq did not re-read its hosts file after SIGHUP")

    def set_srv(self, records: Sequence[Srv]) -> None:
        """Replace the SRV records: a restart on the same port when running."""
        self.srv = list(records)
        if self.running:
            self.restart()

    def queries(self, name: str) -> int:
        """How many queries for ``name`` this instance has logged (``--log-queries``)."""
        if not self.log_file.exists():
            return 0
        return len(re.findall(rf"query\[\w+\] {re.escape(name)} from", self.log_file.read_text()))


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[Dnsmasq]:
    """A started :class:`Dnsmasq` on 127.0.0.1 with no records yet; always stopped.

    Use it with ``from dnsmasq import dns_server as dns_server`` in a test module.
    """
    server = Dnsmasq(tmp_path / "dns")
    try:
        server.start()
        yield server
    finally:
        server.stop()
