"""Workers asking each other (``[gateway] workers > 1``): what worker 0's admin
endpoint needs from the other workers, and the last report each worker made.

The supervisor (:func:`gateway.workers.supervise`) makes a :class:`Fleet` before
its first fork; each worker, right after the fork, keeps its own part of it as a
:class:`Link` (:func:`install`, :func:`current`). Worker 0 asks
(:meth:`Link.query`), the others answer (:meth:`Link.answer`).

Rules kept here:

1. **Inherited, never named.** The channels are socket pairs made by the
   supervisor and inherited through fork: no path, no abstract name, nothing
   another local user could connect to or squat, nothing to clean up. The
   supervisor keeps every end open, so a restarted worker (either side)
   inherits the same channel as the one it replaces.
2. **One fresh stream per question.** A question is one ``SOCK_SEQPACKET``
   datagram carrying its kind, its deadline and, by ``SCM_RIGHTS``, one end of
   a new socket pair; the answer is JSON written to that stream, then EOF. An
   answer can never be read by the wrong question, whatever died in between;
   a question older than its deadline (``CLOCK_MONOTONIC`` is one clock for
   every process) is dropped unanswered.
3. **The asker never waits past its deadline.** A worker that does not answer
   in time (restarting, hung, its queue full) is reported as None; the caller
   decides what that means (``/readyz``: not ready; ``/metrics``: its last
   report, below).
4. **Each worker's last report survives it.** Before a worker answers a
   metrics question it stores the answer in its :class:`Slot`, shared memory
   the supervisor mapped before the first fork. The worker that replaces it
   reads the slot and counts on from there, and worker 0 reads it for a
   worker that does not answer: so a restart never makes a counter go
   backwards, and nothing is counted twice (counts made after the last
   report of a worker killed outright are lost, never duplicated).
"""

from __future__ import annotations

import json
import logging
import mmap
import selectors
import socket
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

__all__ = ["Fleet", "Link", "Slot", "current", "install"]

log = logging.getLogger("l4gw.peers")

HALF = 1 << 20
"""Bytes of one of a slot's two halves (virtual: only pages written are used). A report
is compressed JSON: a few KiB for a config of tens of routes and clusters."""
_HEADER = struct.Struct("<4sQII")
"""magic, sequence number, payload length, CRC-32 of the payload."""
_MAGIC = b"l4gw"
_MAX_QUESTION = 512


class Slot:
    """A worker's last report in shared memory, in two halves so that a worker
    killed in the middle of a write leaves the previous report readable.

    The writer writes the half that does not hold the latest report, payload
    first, header last; a reader takes the valid half (magic, length and CRC)
    with the highest sequence number.
    """

    def __init__(self, memory: mmap.mmap, offset: int) -> None:
        self._memory = memory
        self._offset = offset
        self._seq = max((seq for seq, _, _ in self._halves()), default=0)

    def _halves(self) -> list[tuple[int, int, bytes]]:
        """The valid halves as (sequence number, half, payload)."""
        valid = []
        for half in (0, 1):
            start = self._offset + half * HALF
            magic, seq, length, crc = _HEADER.unpack_from(self._memory, start)
            if magic != _MAGIC or length > HALF - _HEADER.size:
                continue
            payload = self._memory[start + _HEADER.size : start + _HEADER.size + length]
            if zlib.crc32(payload) == crc:
                valid.append((seq, half, payload))
        return valid

    def load(self) -> Any | None:
        """The last report stored, or None."""
        for _, _, payload in sorted(self._halves(), reverse=True):
            try:
                return json.loads(zlib.decompress(payload))
            except (ValueError, zlib.error):
                continue
        return None

    def save(self, value: Any) -> bool:
        """Store ``value`` (JSON); False when it does not fit (then nothing changes)."""
        payload = zlib.compress(json.dumps(value, separators=(",", ":")).encode(), 1)
        if len(payload) > HALF - _HEADER.size:
            return False
        valid = self._halves()
        target = 1 - max(valid)[1] if valid else 0  # never the latest valid report
        start = self._offset + target * HALF
        self._seq += 1
        self._memory[start + _HEADER.size : start + _HEADER.size + len(payload)] = payload
        _HEADER.pack_into(self._memory, start, _MAGIC, self._seq, len(payload), zlib.crc32(payload))
        return True


class Link:
    """One worker's part of the :class:`Fleet`.

    Args:
        index: this worker's index.
        count: how many workers.
        started_ns: when the supervisor started (wall clock, ns): the start of
            every cumulative series, across worker restarts.
        senders: worker 0's ends of the question channels, by worker index.
        receiver: a worker's (index > 0) end of its question channel.
        slots: every worker's slot, by index.
    """

    def __init__(
        self,
        index: int,
        count: int,
        started_ns: int,
        senders: Mapping[int, socket.socket],
        receiver: socket.socket | None,
        slots: list[Slot],
    ) -> None:
        self.index = index
        self.count = count
        self.started_ns = started_ns
        self.senders = dict(senders)
        self.receiver = receiver
        self.slots = slots
        self.previous: Any | None = slots[index].load()
        """What this worker index last reported before this process started (the
        report of the process it replaces), or None."""
        self._too_big_logged = False

    # --- the last report ---------------------------------------------------------------

    def save(self, report: Any) -> None:
        """Store this worker's report before it is answered (rule 4)."""
        if not self.slots[self.index].save(report) and not self._too_big_logged:
            self._too_big_logged = True
            log.error(
                "worker %d: its metrics report exceeds %d bytes compressed and was not "
                "stored; a restart of this worker would lose its counts",
                self.index,
                HALF,
            )

    def last(self, index: int) -> Any | None:
        """The last report worker ``index`` stored, or None."""
        return self.slots[index].load()

    # --- worker 0 asks -----------------------------------------------------------------

    def query(self, kind: str, timeout: float) -> dict[int, Any | None]:
        """Ask every other worker ``kind``; blocking, at most ``timeout`` seconds.

        Returns:
            Each other worker's answer by index, None for those that did not
            answer in time.
        """
        deadline = time.monotonic() + timeout
        question = json.dumps({"kind": kind, "deadline": deadline}).encode()
        results: dict[int, Any | None] = dict.fromkeys(self.senders)
        pending: dict[socket.socket, tuple[int, list[bytes]]] = {}
        for index, sender in self.senders.items():
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                socket.send_fds(sender, [question], [theirs.fileno()], socket.MSG_DONTWAIT)
            except OSError:  # its queue is full: it has not read questions for a while
                mine.close()
                continue
            finally:
                theirs.close()
            mine.setblocking(False)
            pending[mine] = (index, [])
        with selectors.DefaultSelector() as selector:
            for sock in pending:
                selector.register(sock, selectors.EVENT_READ)
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for key, _ in selector.select(left):
                    fileobj = key.fileobj
                    if not isinstance(fileobj, socket.socket):  # pragma: no cover
                        continue
                    sock = fileobj
                    try:
                        chunk = sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    index, chunks = pending[sock]
                    if chunk:
                        chunks.append(chunk)
                        continue
                    del pending[sock]
                    selector.unregister(sock)
                    sock.close()
                    try:
                        results[index] = json.loads(b"".join(chunks))
                    except ValueError:  # it died while answering
                        pass
        for left_open in pending:
            left_open.close()
        return results

    # --- the others answer -------------------------------------------------------------

    async def answer(self, handlers: Mapping[str, Callable[[], Awaitable[Any]]]) -> None:
        """Answer worker 0's questions until cancelled, each in a task of its own.

        Args:
            handlers: by question kind, what makes the answer (JSON-able).
        """
        receiver = self.receiver
        if receiver is None:
            return
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(receiver)
                try:
                    data, fds, _, _ = socket.recv_fds(
                        receiver, _MAX_QUESTION, 1, socket.MSG_DONTWAIT
                    )
                    reply = socket.socket(fileno=fds[0]) if fds else None
                except BlockingIOError:
                    continue
                except OSError as exc:  # never worth a worker: worker 0 sees no answer
                    log.warning(
                        "worker %d: reading worker 0's question failed: %s", self.index, exc
                    )
                    await trio.sleep(1.0)
                    continue
                if reply is not None:
                    nursery.start_soon(self._reply, data, reply, handlers)

    async def _reply(
        self,
        data: bytes,
        reply: socket.socket,
        handlers: Mapping[str, Callable[[], Awaitable[Any]]],
    ) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(reply))
        try:
            question = json.loads(data)
            left = float(question["deadline"]) - time.monotonic()
            handler = handlers.get(str(question["kind"]))
            if left <= 0 or handler is None:
                return
            with trio.move_on_after(left):
                answer = await handler()
                await stream.send_all(json.dumps(answer, default=str).encode())
        except (ValueError, KeyError, TypeError, trio.BrokenResourceError, OSError) as exc:
            log.debug("worker %d: question not answered: %r", self.index, exc)
        except Exception:
            log.exception("worker %d: answering worker 0 failed", self.index)
        finally:
            await trio.aclose_forcefully(stream)


class Fleet:
    """What the supervisor makes before its first fork, and keeps for its life.

    Args:
        count: how many workers.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.started_ns = time.time_ns()
        self.memory = mmap.mmap(-1, 2 * HALF * count)  # shared and anonymous
        self.channels: dict[int, tuple[socket.socket, socket.socket]] = {
            index: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for index in range(1, count)
        }

    def link(self, index: int) -> Link:
        """Worker ``index``'s part, in the forked worker: the other ends are closed
        there (the supervisor keeps them all)."""
        senders: dict[int, socket.socket] = {}
        receiver = None
        for other, (sender, their) in self.channels.items():
            if index == 0:
                senders[other] = sender
                their.close()
            elif other == index:
                receiver = their
                sender.close()
            else:
                sender.close()
                their.close()
        if receiver is not None:
            receiver.setblocking(False)
        slots = [Slot(self.memory, i * 2 * HALF) for i in range(self.count)]
        return Link(index, self.count, self.started_ns, senders, receiver, slots)


_current: Link | None = None


def install(link: Link | None) -> None:
    """Make ``link`` this process's (a worker does, right after the fork)."""
    global _current
    _current = link


def current() -> Link | None:
    """This worker's link; None in a gateway of one process."""
    return _current
