"""Whether a kernel relay tier works here: load it and run its canary, once.

The gateway probes each kernel tier of its policy at start-up, in a worker
thread (:meth:`gateway.relay.tiers.RelayTiers.startup`), and ``l4gw accel
status`` probes the same way from the command line, so "would the sockmap tier
work on this host, with this config, as this user?" has one answer.

Rules kept here:

* **Blocking, and only off the connection path.** :func:`probe` loads BPF and runs
  a canary flow with its own trio loop; callers run it in a thread or before serving.
* **A tier is usable only if its canary passed** (reference/sockmap.md §8 R15): a
  loaded accelerator whose canary failed is closed here, never handed out.
* **Nothing outlives a process.** :func:`remove_stale` removes what a gateway that
  died without cleaning up left: its status file and any ``l4gw*`` pin.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gateway.relay import canary
from gateway.relay.policy import setting
from gateway.relay.sockmap import Accelerator, AcceleratorError, Limits
from gateway.relay.splice import splice_self_test

__all__ = ["BPFFS", "Probe", "limits_from", "pid_alive", "probe", "remove_stale"]

BPFFS: Final = Path("/sys/fs/bpf")


@dataclass(frozen=True, slots=True)
class Probe:
    """The outcome of loading and self-testing one tier.

    Attributes:
        tier: "sockmap" or "splice".
        error: None when usable, else one line saying why not.
        seconds: How long load plus canary took.
        accelerator: The loaded, tested accelerator (sockmap only, when usable);
            the caller owns and closes it.
    """

    tier: str
    error: str | None
    seconds: float
    accelerator: Accelerator | None = None


def limits_from(section: Mapping[str, Any]) -> Limits:
    """The sockmap watchdog's settings of a ``[plugin.relay]`` section."""
    return Limits(
        high_watermark=setting(section, "sockmap_high_watermark"),
        hard_cap=setting(section, "sockmap_hard_cap"),
    )


def probe(tier: str, section: Mapping[str, Any]) -> Probe:
    """Load ``tier`` and run its canary flow; blocking, for a worker thread or the CLI.

    Args:
        tier: "sockmap" or "splice".
        section: The ``[plugin.relay]`` section (missing keys take their defaults).
    """
    start = time.monotonic()
    timeout = float(setting(section, "self_test_timeout"))
    if tier == "splice":
        error = splice_self_test(timeout)
        return Probe(tier, error, time.monotonic() - start)
    path = section.get("sockmap_object") or None
    try:
        acc = Accelerator.load(
            path,
            max_flows=int(setting(section, "sockmap_max_flows")),
            limits=limits_from(section),
        )
    except AcceleratorError as exc:
        return Probe(tier, str(exc), time.monotonic() - start)
    error = canary.self_test(acc, timeout)
    if error is not None:
        acc.close()
        return Probe(tier, f"sockmap self-test: {error}", time.monotonic() - start)
    return Probe(tier, None, time.monotonic() - start, acc)


def remove_stale(status_dir: Path | None) -> list[str]:
    """Remove what a gateway that died without cleaning up left: status files of dead
    processes and ``l4gw*`` pins under /sys/fs/bpf. Returns what was removed."""
    removed: list[str] = []
    if status_dir is not None and status_dir.is_dir():
        for path in status_dir.glob("*.json"):
            if path.stem.isdigit() and not pid_alive(int(path.stem)):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(str(path))
    # The accelerator never pins; a pin can only come from an older or foreign build,
    # and it would keep maps alive forever.
    with contextlib.suppress(OSError):
        for pin in BPFFS.glob("l4gw*"):
            with contextlib.suppress(OSError):
                pin.unlink()
                removed.append(str(pin))
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (the owner of a ``<pid>.json`` status file)."""
    return Path(f"/proc/{pid}").exists()
