"""Pipes for the splice tier, lent to a flow only while bytes are in them.

A pipe holds two descriptors and the kernel's ring of buffer slots for as long as it
is open, with bytes in it or none. A direction of a flow needs one only while its
bytes are on the way through it, so it takes a pipe when its source has bytes and
gives it back once the pipe is empty: a flow idling in the splice tier holds no pipe
and no descriptor beyond its sockets (HAProxy's pipe pool does the same).

Rules kept here:

1. **Only an empty pipe goes back.** The caller counts what it spliced in and out, so
   it knows; a pipe with bytes left in it (a flow cut while they were on the way) is
   closed, never lent again: its bytes belong to the flow they came from.
2. **A bounded reserve.** At most :data:`KEEP` free pipes stay open for the next
   taker; more are closed.
3. **One pool per trio run**, closed with its relay poller (gateway/relay/poller.py);
   a pipe given back after that is closed.
"""

from __future__ import annotations

import fcntl
import os
from typing import Final

__all__ = ["KEEP", "PIPE_SIZE", "Pipe", "PipePool"]

# 1 MiB is the default /proc/sys/fs/pipe-max-size: large enough that one
# splice pair moves a whole GRO batch, and the unprivileged ceiling anyway.
PIPE_SIZE: Final = 1 << 20
KEEP: Final = 16
"""Free pipes kept open for the next flow that has bytes to move (rule 2)."""


class Pipe:
    """One pipe, its two descriptors and its capacity in bytes."""

    __slots__ = ("capacity", "rfd", "wfd")

    def __init__(self) -> None:
        """Raises OSError when no pipe can be made (EMFILE, ENFILE: out of descriptors)."""
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.wfd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # EPERM above pipe-max-size or the per-user pipe quota: the default
            # 64 KiB pipe still works, only with more syscalls per MiB.
            pass
        self.capacity: int = fcntl.fcntl(self.wfd, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


class PipePool:
    """The free pipes of one trio run, and how many are lent."""

    __slots__ = ("closed", "free", "lent", "refused")

    def __init__(self) -> None:
        self.free: list[Pipe] = []
        self.lent = 0
        """Pipes taken and not given back: one per direction with bytes in flight."""
        self.refused = 0
        """Takes that found no free pipe and could not make one."""
        self.closed = False

    def take(self) -> Pipe:
        """An empty pipe. Raises OSError when none is free and none can be made."""
        if self.free:
            pipe = self.free.pop()
        else:
            try:
                pipe = Pipe()
            except OSError:
                self.refused += 1
                raise
        self.lent += 1
        return pipe

    def give(self, pipe: Pipe, empty: bool = True) -> None:
        """Take back a lent pipe; ``empty=False`` closes it (rule 1)."""
        self.lent -= 1
        if empty and not self.closed and len(self.free) < KEEP:
            self.free.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        self.closed = True
        while self.free:
            self.free.pop().close()
