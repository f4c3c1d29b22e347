"""The container image end to end: built by scripts/build-image, run by podman.

The gateway runs from the image as it would in production: as the image's
non-root user, with only the capabilities its features need (``--cap-drop
all --cap-add ...``), its config mounted at /etc/l4gw/gateway.toml, in the
gateway namespace of the three-namespace topology (``podman --network
ns:/run/netns/<gw>``, the container analogue of Kubernetes' hostNetwork). The
client and the backend are in their own namespaces, so every byte crosses
the container's network stack.

scripts/build-image rebuilds only when a build input changed (the first build
on a machine takes a few minutes; later runs reuse the image). Podman runs with
runc and the cgroupfs manager, and ulimits within the machine's hard limits:
see scripts/build-image for why.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from backends import HEADER, ScriptedBackend, check_exchange, digest, recv_all
from netns import BACKEND4, CLIENT4, GW_CLIENT_SIDE4, Topology, tcp_connect, tcp_listen
from netns import topology as topology  # the fixture
from relay_helpers import payload

pytestmark = [pytest.mark.slow, pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("L4GW_TEST_IMAGE", "localhost/l4gw:test")
IN_CI = bool(os.environ.get("CI"))
SERVICE = "198.18.2.10"  # exists nowhere: the client's default route sends it to the gateway
BACKEND_PORT, TPROXY_PORT, PLAIN_PORT, ADMIN_PORT = 8080, 15001, 7000, 9901
KiB, MiB = 1024, 1024 * 1024
# A first build downloads the toolchain and the wheels: minutes, not seconds.
BUILD_TIMEOUT = 1200

_names = itertools.count()


# --- podman -----------------------------------------------------------------------------------


def podman_argv(*args: str) -> list[str]:
    """podman with this machine's needs: runc (crun refuses hybrid cgroup layouts) and
    cgroupfs (no systemd)."""
    return ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", *args]


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(podman_argv(*args), capture_output=True, text=True, timeout=timeout)


def ulimits() -> list[str]:
    """podman's default ulimits exceed some machines' hard limits, and conmon holds
    RLIMIT_NPROC at pid_max: stay within both (as scripts/build-image does)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if nproc == resource.RLIM_INFINITY or nproc > pid_max:
        nproc = pid_max
    flags = ["--ulimit", f"nproc={nproc}:{nproc}"]
    if nofile != resource.RLIM_INFINITY:
        flags += ["--ulimit", f"nofile={nofile}:{nofile}"]
    return flags


def remove_stale_containers() -> None:
    """Containers of earlier runs whose pytest process is gone."""
    listed = podman("ps", "-a", "--format", "{{.Names}}")
    for name in listed.stdout.split():
        m = re.fullmatch(r"l4gw-test-(\d+)-\d+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            podman("rm", "-f", "-t", "0", name)


@dataclass
class Container:
    name: str

    def logs(self) -> str:
        result = podman("logs", self.name)
        return result.stdout + result.stderr

    def state(self) -> dict[str, object]:
        result = podman("inspect", "--format", "{{json .State}}", self.name)
        state: dict[str, object] = json.loads(result.stdout) if result.returncode == 0 else {}
        return state

    def wait_log(self, pattern: str, timeout: float = 30) -> str:
        """Wait until ``pattern`` (a regex) is in the container's log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.logs()
            if re.search(pattern, text):
                return text
            if not self.state().get("Running"):
                raise AssertionError(f"container stopped waiting for {pattern!r}; log:\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timeout waiting for {pattern!r}; log:\n{text}")
            time.sleep(0.2)

    def stop(self, timeout: int = 20) -> int:
        """SIGTERM (the image's STOPSIGNAL), SIGKILL after ``timeout``; the exit code."""
        podman("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        code = self.state().get("ExitCode")
        assert isinstance(code, int)
        return code

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name)


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built (or found up to date) by scripts/build-image."""
    if shutil.which("podman") is None:
        message = "podman is not installed (scripts/install.sh installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        result = subprocess.run(
            [str(ROOT / "scripts" / "build-image"), "--tag", IMAGE],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/build-image took over {BUILD_TIMEOUT}s: {exc.stderr!r}")
    assert result.returncode == 0, f"scripts/build-image failed:\n{result.stderr[-6000:]}"
    assert result.stdout.strip().splitlines()[-1] == IMAGE
    return IMAGE


StartContainer = Callable[..., Container]


@pytest.fixture
def container(image: str, tmp_path: Path) -> Iterator[StartContainer]:
    """Factory: ``container(config_text, netns=..., caps=[...])`` runs the image detached."""
    remove_stale_containers()
    started: list[Container] = []

    def start(
        config: str, *, netns: str, caps: tuple[str, ...] = (), options: tuple[str, ...] = ()
    ) -> Container:
        name = f"l4gw-test-{os.getpid()}-{next(_names)}"
        etc = tmp_path / name
        etc.mkdir()
        (etc / "gateway.toml").write_text(config)
        # The image's user (10001) reads the mount.
        etc.chmod(0o755)
        (etc / "gateway.toml").chmod(0o644)
        argv = ["run", "-d", "--name", name, "--network", f"ns:/run/netns/{netns}"]
        argv += ["--cap-drop", "all", *[f"--cap-add={c}" for c in caps]]
        argv += [*ulimits(), *options, "-v", f"{etc}:/etc/l4gw:ro", image]
        ctr = Container(name)
        started.append(ctr)
        result = podman(*argv)
        assert result.returncode == 0, f"podman run: {result.stderr}"
        return ctr

    yield start
    for ctr in started:
        ctr.remove()


def config(*, backend_port: int = BACKEND_PORT, extra: str = "") -> str:
    """TPROXY for SERVICE:80 (set up by the gateway itself), a plain listener, transparent
    upstream (the backend sees the client), the admin endpoint, the access log on stdout."""
    return f"""
[gateway]
drain_timeout = "5s"
log_connections = true

[[listener]]
name = "tp4"
bind = "0.0.0.0:{TPROXY_PORT}"
transparent = true

[[listener]]
name = "plain"
bind = "{GW_CLIENT_SIDE4}:{PLAIN_PORT}"

[[route]]
listener = "tp4"
destination = ["{SERVICE}/32"]
ports = [80]
cluster = "as-client"

[[route]]
listener = "plain"
cluster = "as-gateway"

[cluster.as-client]
endpoints = ["{BACKEND4}:{backend_port}"]
upstream_source = "client"

[cluster.as-gateway]
endpoints = ["{BACKEND4}:{backend_port}"]

[tproxy]
manage = true

[[tproxy.intercept]]
listener = "tp4"
destination = ["{SERVICE}/32"]
ports = [80]

[admin]
bind = "0.0.0.0:{ADMIN_PORT}"
insecure = true  # no token: only the test's namespaces reach it

[plugin.accesslog]
path = "-"
{extra}
"""


async def exchange(
    ns: str, host: str, port: int, send: int, reply: int, seed: int
) -> tuple[tuple[int, str], bytes]:
    """The scripted exchange of tests/support/backends.py, from namespace ``ns``."""
    stream = await tcp_connect(ns, host, port)
    mine = payload(send, seed)
    got: list[bytes] = []
    async with stream:
        await stream.send_all(HEADER.pack(reply, seed, 0))

        async def receive() -> None:
            got.append(await recv_all(stream))

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(receive)
                await stream.send_all(mine)
                await stream.send_eof()
    return digest(mine), got[0]


async def http_get(ns: str, host: str, port: int, path: str) -> bytes:
    stream = await tcp_connect(ns, host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: gw\r\n\r\n".encode())
        with trio.fail_after(10):
            return await recv_all(stream, 1 << 20)


def nft_tables(topo: Topology) -> list[tuple[str, str]]:
    """(family, name) of every nftables table in the gateway namespace."""
    ruleset = json.loads(topo.exec(topo.gateway, "nft", "-j", "list", "tables", check=True).stdout)
    tables = [item["table"] for item in ruleset["nftables"] if "table" in item]
    return [(t["family"], t["name"]) for t in tables]


def seccomp_allowing_bpf(path: Path) -> Path:
    """podman's default seccomp profile, with bpf(2) allowed to holders of CAP_BPF (it
    allows it to CAP_SYS_ADMIN only): the profile docs/operations.md tells users to make.

    Two rules may not give one syscall different actions, so bpf leaves the EPERM rule
    for everything without CAP_SYS_ADMIN and gets its own pair.
    """
    profile = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    for rule in profile["syscalls"]:
        if "bpf" in rule["names"] and rule["action"] == "SCMP_ACT_ERRNO":
            rule["names"].remove("bpf")
    profile["syscalls"] += [
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_BPF"]}},
        {
            "names": ["bpf"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
            "excludes": {"caps": ["CAP_SYS_ADMIN", "CAP_BPF"]},
        },
    ]
    path.write_text(json.dumps(profile))
    return path


async def serve_backend(nursery: trio.Nursery, topo: Topology) -> ScriptedBackend:
    backend = ScriptedBackend()
    listener = tcp_listen(topo.backend, BACKEND4, BACKEND_PORT)
    nursery.start_soon(trio.serve_listeners, backend.serve, [listener])
    return backend


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.timeout(BUILD_TIMEOUT + 120)
async def test_image_intercepts_relays_and_answers_healthz_with_net_admin_only(
    topology: Topology, container: StartContainer, nursery: trio.Nursery
) -> None:
    """The image as non-root with NET_ADMIN alone: it installs TPROXY in its network
    namespace (``l4gw tproxy doctor`` inside finds all well), relays an intercepted
    connection byte-exact from the client's own address (transparent upstream) and a plain
    one, answers /healthz (also through the image's HEALTHCHECK), reloads on SIGHUP, and on
    SIGTERM drains, exits 0 and removes what it installed."""
    topo = topology
    backend = await serve_backend(nursery, topo)
    ctr = container(config(), netns=topo.gateway, caps=("NET_ADMIN",))
    log = await trio.to_thread.run_sync(ctr.wait_log, r"ready: ")
    assert "tproxy: set up" in log

    user = podman("exec", ctr.name, "id", "-u")
    assert user.stdout.strip() == "10001"
    doctor = podman("exec", ctr.name, "l4gw", "tproxy", "doctor", "-c", "/etc/l4gw/gateway.toml")
    assert doctor.returncode == 0 and "doctor: all well" in doctor.stdout, doctor.stdout

    sent, got = await exchange(topo.client, SERVICE, 80, 3 * MiB, 2 * MiB, seed=21)
    await check_exchange(backend, 21, sent, got, 2 * MiB)
    assert backend.peers[-1][0] == CLIENT4  # the backend saw the client itself

    sent, got = await exchange(topo.client, GW_CLIENT_SIDE4, PLAIN_PORT, 256 * KiB, 0, seed=22)
    await check_exchange(backend, 22, sent, got, 0)
    assert backend.peers[-1][0] != CLIENT4  # a plain cluster connects from the gateway

    health = await http_get(topo.client, GW_CLIENT_SIDE4, ADMIN_PORT, "/healthz")
    assert health.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), health[:200]
    check = podman("healthcheck", "run", ctr.name)
    assert check.returncode == 0, f"HEALTHCHECK: {check.stdout} {check.stderr}"

    access = await trio.to_thread.run_sync(ctr.wait_log, r'"route": ?"route1"')
    lines = [json.loads(x) for x in access.splitlines() if x.startswith("{")]
    assert {(x["route"], x["bytes_from_client"]) for x in lines} >= {
        ("route0", HEADER.size + 3 * MiB),
        ("route1", HEADER.size + 256 * KiB),
    }

    assert nft_tables(topo) == [("inet", "l4gw")]
    podman("kill", "--signal", "HUP", ctr.name)
    await trio.to_thread.run_sync(ctr.wait_log, r"reloaded /etc/l4gw/gateway.toml")
    assert await trio.to_thread.run_sync(ctr.stop) == 0
    log = ctr.logs()
    assert "SIGTERM: stopping" in log and "tproxy: torn down" in log
    assert nft_tables(topo) == []


@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_image_without_net_admin_says_which_capability_is_missing(
    topology: Topology, container: StartContainer
) -> None:
    """No capability at all: TPROXY cannot be set up; the gateway exits with an error
    naming what is missing, leaves nothing behind, and never reports ready."""
    ctr = container(config(), netns=topology.gateway)
    deadline = time.monotonic() + 30
    while ctr.state().get("Running") and time.monotonic() < deadline:
        time.sleep(0.2)
    state, log = ctr.state(), ctr.logs()
    assert not state.get("Running"), log
    assert state.get("ExitCode") not in (0, None), log
    assert "ready: " not in log
    assert re.search(r"not permitted|CAP_NET_ADMIN", log, re.IGNORECASE), log
    assert nft_tables(topology) == []


@pytest.mark.timeout(BUILD_TIMEOUT + 120)
async def test_sockmap_tier_in_the_image_with_bpf_perfmon_and_a_seccomp_profile(
    topology: Topology, container: StartContainer, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The sockmap tier in the container: NET_ADMIN + BPF + PERFMON and a seccomp profile
    that allows bpf(2) are enough (no --privileged); flows move through it byte-exact."""
    topo = topology
    backend = await serve_backend(nursery, topo)
    profile = seccomp_allowing_bpf(tmp_path / "seccomp-bpf.json")
    relay = """
[plugin.relay]
tiers = ["sockmap", "splice", "copy"]
promote_after_bytes = 0
promote_after = 0
"""
    ctr = container(
        config(extra=relay),
        netns=topo.gateway,
        caps=("NET_ADMIN", "BPF", "PERFMON"),
        options=("--security-opt", f"seccomp={profile}"),
    )
    log = await trio.to_thread.run_sync(ctr.wait_log, r"ready: ")
    assert "relay: tiers sockmap > splice > copy" in log, log
    sent, got = await exchange(topo.client, GW_CLIENT_SIDE4, PLAIN_PORT, 2 * MiB, 2 * MiB, seed=31)
    await check_exchange(backend, 31, sent, got, 2 * MiB)
    access = await trio.to_thread.run_sync(ctr.wait_log, r'"tier": ?"sockmap"')
    assert '"close_reason"' in access
    assert await trio.to_thread.run_sync(ctr.stop) == 0


@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_image_contents(image: str, tmp_path: Path) -> None:
    """Runs as UID 10001, carries the BPF objects and no toolchain, validates the annotated
    example with its own plugins, and has OCI labels and a HEALTHCHECK."""
    script = (
        'echo "uid=$(id -u)"; '
        'echo "toolchain=$(command -v clang gcc cc make ld | tr "\\n" " ")"; '
        "python3 -c 'import gateway, pathlib; "
        'd = pathlib.Path(gateway.__file__).parent / "bpf"; '
        's = [o.stat().st_size for o in d.glob("*.bpf.o")]; '
        'print(f"bpf={min(s)}"); print(f"objects={len(s)}")\'; '
        'echo "check=$(l4gw check -c /etc/l4gw/example.toml 2>&1)"'
    )
    # The image does not carry the example plugin packages: the cluster fed by
    # examples/plugin-exec-discovery gets an address instead, and its section goes.
    text = (ROOT / "examples" / "gateway.toml").read_text()
    text, swapped = re.subn(r'discovery = "exec_discovery"', 'endpoints = ["192.0.2.1:80"]', text)
    text, dropped = re.subn(r"^\[plugin\.exec_discovery\].*?(?=^\[)", "", text, flags=re.M | re.S)
    assert swapped == dropped == 1
    example = tmp_path / "example.toml"
    example.write_text(text)
    example.chmod(0o644)
    result = podman(
        "run", "--rm", *ulimits(), "--network", "none",
        "-v", f"{example}:/etc/l4gw/example.toml:ro",
        "--entrypoint", "sh", image, "-c", script,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    facts = dict(line.partition("=")[::2] for line in result.stdout.splitlines())
    assert facts["uid"] == "10001"
    assert facts["toolchain"].strip() == ""
    assert int(facts["bpf"]) > 1000
    assert int(facts["objects"]) == len(list((ROOT / "bpf").glob("*.bpf.c")))
    assert facts["check"] == "ok"

    info = json.loads(podman("image", "inspect", image).stdout)[0]
    assert info["Config"]["User"] == "10001:10001"
    assert info["Config"]["Entrypoint"] == ["l4gw"]
    assert info["Config"]["Cmd"] == ["run", "-c", "/etc/l4gw/gateway.toml"]
    labels = info["Labels"]
    assert labels["org.opencontainers.image.title"] == "l4gw"
    assert labels["org.opencontainers.image.version"]
    assert labels["org.l4gw.inputs"]
    probe = " ".join(info["Healthcheck"]["Test"])
    # The probe starts no interpreter (scripts/healthcheck: bash and /dev/tcp).
    assert "l4gw-healthcheck" in probe and "python" not in probe, probe
