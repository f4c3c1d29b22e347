"""Types of the compiled copy loop and delivery (gateway/relay/_copystep.c documents them)."""

from collections.abc import Callable, Sequence
from typing import Any

from typing_extensions import Buffer

DRAINED: int
SHORT: int
BUDGET: int
LIMIT: int
END: int
HELD: int
SRC_ERROR: int
DST_ERROR: int
CLIENT_EOF: str
BACKEND_EOF: str

def move(
    scratch: Buffer, src: int, dst: int, budget: int, stop_short: bool, limit: int, /
) -> tuple[int, int, int, int, int]: ...
def accept(listener: Any, /) -> tuple[int, Any] | None: ...
def serve(waiter: Any, side: int, events: int, clock: Callable[[], float], /) -> bool: ...
def wait(
    owners: dict[int, tuple[Any, int]],
    reschedule: Callable[[Any], object],
    clock: Callable[[], float],
    epfd: int,
    timeout: float,
    maxevents: int,
    /,
) -> list[tuple[int, int]] | bool: ...
def deliver(
    owners: dict[int, tuple[Any, int]],
    reschedule: Callable[[Any], object],
    clock: Callable[[], float],
    events: Sequence[tuple[int, int]],
    /,
) -> list[tuple[int, int]] | None: ...
