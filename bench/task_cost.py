#!/usr/bin/env python3
"""What trio's task per connection costs, alone: user-space instructions per task.

    .venv/bin/python bench/task_cost.py                 # 16,000 tasks of each kind
    .venv/bin/python bench/task_cost.py --tasks 2000 --json tasks.json

Every connection through the gateway is served by a trio task of its own (the brief's
structured concurrency): spawned by the accept loop, run once, parked in the relay
poller until its flow ends, woken, run again, exited; since gateway/taskpool.py, kept
for the next connection instead of exited. This script measures that lifecycle with no
socket and no l4gw code around it, in a trio run set up as the gateway sets its own
up (gateway/runloop.py: the instrument checks in C, ``park`` one frame lighter), so
that bench/README.md can say which part of a new connection's cost is the task itself.

Three kinds, batches of 16 started from one parent task as the accept loop starts them:

* ``park``: spawn, one step that parks, a reschedule, a second step that exits: a
  short connection's task.
* ``spawn``: spawn, one step that exits.
* ``kept``: the gateway's own :class:`gateway.taskpool.TaskPool` (what the server
  runs each connection in): a task kept from an earlier connection is woken, parks
  once, is woken and parks in the pool again (a new task only while none is kept).

Each kind runs under valgrind's callgrind twice, with no task and with ``--tasks``,
and the difference divided by the count is the cost of one task (the interpreter's
start and the run's own setup cancel out). Counted, not timed: the same to well under
1 % from run to run on this shared machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("park", "spawn", "kept")


def child(kind: str, count: int) -> None:
    """The measured program: ``count`` tasks of ``kind`` in one trio run."""
    sys.path.insert(0, str(ROOT))
    import trio
    from trio.lowlevel import Abort, checkpoint, current_task, reschedule

    from gateway import runloop
    from gateway.taskpool import TaskPool

    parked: list[trio.lowlevel.Task] = []

    def abort(_: object) -> Abort:
        return Abort.SUCCEEDED

    async def connection() -> None:
        if kind != "spawn":
            parked.append(current_task())
            await runloop.park(abort)

    async def main() -> None:
        runloop.fast_instrument_checks()
        async with trio.open_nursery() as nursery:
            pool = TaskPool(connection, nursery, "connection", runloop.run_spawn())
            done = 0
            while done < count:
                for _ in range(16):
                    if kind == "kept":
                        pool.start(())
                    else:
                        nursery.start_soon(connection, name="connection")
                await checkpoint()  # the batch runs: at most 16 live, as connections come
                woken = 0
                # trio runs a batch in random order: wait until all 16 have parked.
                while kind != "spawn" and woken < 16:
                    while parked:
                        reschedule(parked.pop())
                        woken += 1
                    await checkpoint()
                done += 16
            nursery.cancel_scope.cancel()  # the kept tasks end

    trio.run(main)


def instructions(kind: str, count: int, workdir: Path) -> int:
    """Instructions of one whole run of the child under callgrind."""
    out = workdir / f"{kind}-{count}.callgrind"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    argv += [sys.executable, __file__, "--child", kind, str(count)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=16000, help="tasks per kind (16000)")
    p.add_argument("--child", nargs=2, metavar=("KIND", "COUNT"), help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--quick", action="store_true", help="smoke run: 160 tasks")
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    if args.quick:
        args.tasks = 160
    if args.tasks < 16 or args.tasks % 16:
        p.error("--tasks: a multiple of 16 (the batch)")
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="l4gw-taskcost-") as tmp:
        for kind in KINDS:
            base = instructions(kind, 0, Path(tmp))
            total = instructions(kind, args.tasks, Path(tmp))
            result[kind] = (total - base) / args.tasks
            print(f"{kind}: {result[kind]:,.0f} instructions per task", file=sys.stderr)
    print("| task | user-space instructions per task |\n|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {result[kind]:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"tasks": args.tasks, "result": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
