"""Types of the compiled copy loop (gateway/relay/_copystep.c documents it)."""

from typing_extensions import Buffer

DRAINED: int
SHORT: int
BUDGET: int
LIMIT: int
END: int
HELD: int
SRC_ERROR: int
DST_ERROR: int

def move(
    scratch: Buffer, src: int, dst: int, budget: int, stop_short: bool, limit: int, /
) -> tuple[int, int, int, int, int]: ...
