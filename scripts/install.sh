#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for l4gw: system packages, then a
# virtual environment in .venv with l4gw (editable) and its test tools.
#
#   scripts/install.sh            system packages + venv with test extras
#   scripts/install.sh --runtime  only what the gateway needs at run time
#                                 (the Containerfile's runtime stage)
#   scripts/install.sh --build    run time + the BPF/wheel toolchain, no venv
#                                 (the Containerfile's build stage)
#
# Idempotent: a second run installs nothing new.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-dev}
venv=${L4GW_VENV:-$here/.venv}

runtime_pkgs=(python3 python3-venv libbpf1 libnftables1 nftables iproute2 ca-certificates)
# Kernel tiers need the BPF object compiled; tests need real peers
# (nginx, haproxy, redis, dnsmasq, dig, iperf3, wrk) and container tools
# (the container test builds and runs the image with podman, from a base
# made with debootstrap when no registry is reachable; runc because crun
# refuses hybrid cgroup layouts). iptables: the doctor's tests seed
# iptables-legacy rules (and the doctor reads them with its -save tools).
# systemd: systemd-analyze verifies the shipped unit (examples/systemd/).
# strace, valgrind: bench/conn_cost.py counts syscalls and instructions per
# connection (its smoke test runs the instruction count).
build_pkgs=(clang llvm libbpf-dev linux-libc-dev make gcc python3-dev)
dev_pkgs=("${build_pkgs[@]}"
          nginx-light libnginx-mod-stream haproxy redis-server dnsmasq-base dnsutils iperf3 wrk
          iputils-ping procps psmisc curl iptables systemd strace valgrind
          podman buildah runc debootstrap)

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

want=("${runtime_pkgs[@]}")
case "$mode" in
  --runtime) ;;
  --build) want+=("${build_pkgs[@]}") ;;
  *) want+=("${dev_pkgs[@]}") ;;
esac
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The DNS tests start their own dnsmasq (tests/support/dnsmasq.py): dnsmasq-base
# ships the binary only, no service to disable.
if [ "$mode" != "--runtime" ] && [ "$mode" != "--build" ] && ! command -v dnsmasq >/dev/null \
   && [ ! -x /usr/sbin/dnsmasq ]; then
  echo "install: dnsmasq-base is installed but no dnsmasq binary was found" >&2
  exit 1
fi
# Debian starts these on install; the tests start their own instances.
for svc in nginx haproxy redis-server; do
  if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then
    sudo_ systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done

if [ "$mode" = "--runtime" ] || [ "$mode" = "--build" ]; then
  exit 0
fi

# The venv runs on the distribution's python3, installed above: the interpreter the
# container image runs (Containerfile), an optimized build (profile-guided, libpython
# linked in). A python3 found first on PATH may be another build: pyenv's default
# (shared libpython, no PGO) costs the gateway 9 % more instructions and more CPU per
# new connection (bench/README.md, "The interpreter"). L4GW_PYTHON names another.
python=${L4GW_PYTHON:-/usr/bin/python3}
base() { "$1" -c 'import os, sys; print(os.path.realpath(sys._base_executable))'; }
if [ -x "$venv/bin/python" ] && [ -f "$venv/pyvenv.cfg" ] \
   && [ "$(base "$venv/bin/python")" != "$(base "$python")" ]; then
  echo "install: $venv runs $(base "$venv/bin/python"), not $(base "$python"): made again"
  "$python" -m venv --clear "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e "$here[test]"
# The example third-party plugin is installed like any other package, so
# the tests prove that loading by entry point works.
for ex in "$here"/examples/plugin-*/; do
  [ -f "$ex/pyproject.toml" ] && "$venv/bin/pip" install -q -e "$ex"
done
make -s -C "$here/bpf" || echo "install: BPF object not built (the sockmap tier will say why at run time)"
echo "install: ready ($venv)"
