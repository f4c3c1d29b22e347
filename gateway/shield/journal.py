"""The shield's entries as every worker sees them: a journal in shared memory.

The kernel map holds what the BPF program needs (key, deadline, drops); the
reason, the source and the time an entry was added must be visible to every
worker too (the admin endpoint runs in worker 0, an automatic verdict comes
from any worker), and so must the entries themselves when the kernel shield
is off and the plugins enforce them in ``l4gw_admit``. They live here.

Rules kept here:

* **One memfd, made before the fork.** The supervisor (or the single
  process) creates it with the table; every worker inherits the descriptor,
  so the journal lives exactly as long as the gateway: nothing in the file
  system to clean up after a kill -9, no permission to keep after the drop
  to ``[gateway] user``.
* **Append-only JSON lines, replayed.** A change appends one record; a
  reader reads what was appended since its last read. Whether anything was
  appended is one read of a shared counter (an anonymous shared mapping, also
  made before the fork, that every writer bumps after its change): the
  plugins ask on every new connection, so "nothing changed" costs no system
  call. When the journal outgrows
  :data:`COMPACT_AT` and most of it is history, the writer rewrites it as a
  snapshot under a new epoch; a reader that sees the epoch change replays
  from the start.
* **POSIX record locks (``lockf``), not ``flock``.** Forked workers share
  the inherited open file description, and ``flock`` locks belong to the
  description: they would not exclude each other. Record locks belong to the
  process. Threads of one process are excluded by a ``threading`` lock (the
  ``/metrics`` text is built in a worker thread).
* Critical sections are short (a read of new records, an append, a map
  update); the loop may block on the lock for that long.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

log = logging.getLogger("l4gw.shield")

_HEADER = "l4gw-shield epoch %020d\n"
HEADER_SIZE: Final = len(_HEADER % 0)
COMPACT_AT: Final = 4 << 20
"""Bytes of journal beyond which a writer considers compacting it."""


class Journal:
    """Records shared by the processes forked after it was made.

    Args:
        fd: an existing journal's descriptor (default: a new memfd).
        version: that journal's shared change counter (with ``fd``; see :meth:`clone`).
    """

    def __init__(self, fd: int | None = None, version: mmap.mmap | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("l4gw-shield", os.MFD_CLOEXEC)
            os.pwrite(fd, (_HEADER % 1).encode(), 0)
        self.fd = fd
        self.thread_lock = threading.RLock()
        """Held by every reader and writer of this process (see the module rules)."""
        self._epoch = -1
        self._offset = HEADER_SIZE
        self._partial = b""
        # MAP_SHARED (the default) and anonymous: shared with every process forked later.
        self._version = version if version is not None else mmap.mmap(-1, 8)
        # One 64-bit word read in place: the per-connection "anything new?" is an index,
        # not a slice and a conversion (~150 ns less per lookup).
        self._counter = memoryview(self._version).cast("Q")
        self._seen = -1

    def clone(self) -> Journal:
        """The same journal through another descriptor (as a forked worker has it)."""
        return Journal(os.dup(self.fd), self._version)

    def _current_version(self) -> int:
        version: int = self._counter[0]
        return version

    def _bump(self) -> None:
        # Under the exclusive lock: no two writers increment at once.
        self._counter[0] = (self._counter[0] + 1) % (1 << 64)

    @contextmanager
    def locked(self, exclusive: bool = True) -> Iterator[None]:
        """Hold the journal (every process and thread) for a read or a change."""
        with self.thread_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _read_epoch(self) -> int:
        header = os.pread(self.fd, HEADER_SIZE, 0)
        try:
            return int(header.split()[-1])
        except (ValueError, IndexError):
            return -1  # being rewritten: read it again under the lock

    def changed(self) -> bool:
        """Whether there is anything this process has not read (no lock, no system call)."""
        # Read in place, not through _current_version(): this runs per connection.
        version: int = self._counter[0]
        return version != self._seen

    def read_new(self) -> tuple[bool, list[dict[str, Any]]]:
        """What was appended since the last call (hold :meth:`locked`).

        Returns:
            (replay, records): ``replay`` is True when the journal was rewritten
            since the last read and ``records`` starts from its beginning.
        """
        # Read before the records: a change made after this shows as a new version.
        self._seen = self._current_version()
        epoch = self._read_epoch()
        replay = epoch != self._epoch
        if replay:
            self._epoch, self._offset, self._partial = epoch, HEADER_SIZE, b""
        size = os.fstat(self.fd).st_size
        chunks = [self._partial]
        while self._offset < size:
            chunk = os.pread(self.fd, min(size - self._offset, 1 << 20), self._offset)
            if not chunk:
                break
            chunks.append(chunk)
            self._offset += len(chunk)
        data = b"".join(chunks)
        complete, _, self._partial = data.rpartition(b"\n")
        records = []
        for line in complete.split(b"\n"):
            try:
                if line:
                    records.append(json.loads(line))
            except ValueError:  # not written by this module: never expected, never fatal
                log.error("shield journal: skipped an unreadable record %r", line[:80])
        return replay, records

    def append(self, *records: dict[str, Any]) -> None:
        """Add records at the end (hold :meth:`locked` and read first)."""
        data = b"".join(_line(r) for r in records)
        end = os.fstat(self.fd).st_size
        os.pwrite(self.fd, data, end)
        self._bump()

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace everything with ``records`` under a new epoch (hold :meth:`locked`)."""
        epoch = self._read_epoch() + 1
        data = (_HEADER % epoch).encode() + b"".join(_line(r) for r in records)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        self._bump()

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"
