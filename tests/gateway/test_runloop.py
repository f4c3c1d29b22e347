"""gateway/runloop.py: trio's instrument checks in C, with trio's instruments unchanged."""

from __future__ import annotations

import trio
import trio.lowlevel
from trio._core._run import GLOBAL_RUN_CONTEXT

from gateway.runloop import fast_instrument_checks


class Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0
        self.spawned = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


async def test_instruments_added_before_and_after_are_still_called() -> None:
    early = Steps()
    trio.lowlevel.add_instrument(early)
    assert fast_instrument_checks()
    assert fast_instrument_checks()  # a second call in the same run changes nothing
    instruments = GLOBAL_RUN_CONTEXT.runner.instruments
    assert type(instruments).__contains__ == instruments.data.__contains__  # in C now
    assert "before_task_step" in instruments and "after_io_wait" not in instruments
    late = Steps()
    trio.lowlevel.add_instrument(late)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.lowlevel.checkpoint)
    await trio.lowlevel.checkpoint()
    assert early.steps > 0 and late.steps > 0 and early.spawned == late.spawned == 1
    trio.lowlevel.remove_instrument(early)
    trio.lowlevel.remove_instrument(late)
    assert "before_task_step" not in instruments and "task_spawned" not in instruments
    steps = late.steps
    await trio.lowlevel.checkpoint()
    assert late.steps == steps  # removed: no longer called


def test_each_run_gets_its_own_checks() -> None:
    """The class made for one run answers from that run's dict, not another's."""

    async def main(add: bool) -> bool:
        assert fast_instrument_checks()
        if add:
            trio.lowlevel.add_instrument(Steps())
        return "before_task_step" in GLOBAL_RUN_CONTEXT.runner.instruments

    assert trio.run(main, True) is True
    assert trio.run(main, False) is False
