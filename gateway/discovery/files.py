"""``endpoints_file``: a JSON list of endpoint forms, watched for replacement.

The file holds the forms ``endpoints`` takes in the config, as JSON::

    ["10.0.0.7:8080", {"address": "api.internal:8080", "weight": 2},
     {"srv": "_api._tcp.internal"}]

Rules kept here:

* **Polled, not notified**: ``(st_ino, st_mtime_ns, st_size)`` is compared every
  :data:`POLL_INTERVAL`. An atomic replacement (write a temporary file, rename it
  over the old one: what Kubernetes ConfigMap volumes, consul-template and
  ``mv`` do) always changes the inode; an in-place rewrite changes the mtime or
  size. inotify would see a rename only while the directory stays the same
  mount, and a poll a second is nothing.
* **A bad file changes nothing**: a JSON error or a bad item keeps the last good
  set; the problem is reported once per version of the file (the caller logs
  it), naming the file and the item (``[2].address: not a port ...``).
* **A missing file is an empty set at start**, and later keeps the last good set
  (a replacement by rename never leaves it missing; a deletion is a mistake more
  often than an intent).
* Reading happens off the event loop (the caller runs :meth:`Watch.poll_now` in
  a thread), except the first read at configuration time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from gateway.config import Endpoint, NamedEndpoint, SrvEndpoint, endpoint_spec
from gateway.schema import Invalid

POLL_INTERVAL = 1.0
"""Seconds between two looks at the file."""

MAX_SIZE = 16 << 20
"""A file larger than this is refused, not read (a mistaken path to a log)."""

Stamp = tuple[int, int, int]
"""(st_ino, st_mtime_ns, st_size)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a version of the file cannot be used."""

    text: str
    missing: bool = False

    def __str__(self) -> str:
        return self.text


Parsed = tuple[tuple[Endpoint, ...], tuple[NamedEndpoint | SrvEndpoint, ...]]
"""(literal endpoints, names and SRV names) of a good file."""
Result = Parsed | Problem


def parse(text: str | bytes) -> Parsed:
    """The endpoints of a file's content.

    Raises:
        Invalid: with one problem per bad item (its index and sub key), or one
            for the whole document.
    """
    try:
        document: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Invalid(f"not valid JSON: {exc}") from None
    if not isinstance(document, list):
        raise Invalid(f"expected a JSON list of endpoints, got {type(document).__name__}")
    literals: list[Endpoint] = []
    names: list[NamedEndpoint | SrvEndpoint] = []
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(document):
        try:
            spec = endpoint_spec(item)
        except Invalid as exc:
            problems.extend((f"[{i}]{sub}", message) for sub, message in exc.problems)
            continue
        if isinstance(spec, Endpoint):
            literals.append(spec)
        elif spec not in names:
            names.append(spec)
    if problems:
        raise Invalid(problems=problems)
    return tuple(literals), tuple(names)


def describe(exc: Invalid) -> str:
    return "; ".join(f"{sub}: {message}" if sub else message for sub, message in exc.problems)


class Watch:
    """One watched file: :meth:`poll_now` says what changed since the last call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp: Stamp | None = None
        self.seen_missing = False

    def poll_now(self) -> Result | None:
        """The file's content when it changed since the last call, else None.

        Blocking (stat and read): run it in a thread from the event loop.
        """
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self.seen_missing:
                return None
            self.seen_missing, self.stamp = True, None
            return Problem(f"cannot read: {exc.strerror}", missing=True)
        self.seen_missing = False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self.stamp:
            return None
        self.stamp = stamp
        if st.st_size > MAX_SIZE:
            return Problem(f"larger than {MAX_SIZE >> 20} MiB: not an endpoints file")
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_SIZE + 1)
        except OSError as exc:
            return Problem(f"cannot read: {exc.strerror}")
        try:
            return parse(data)
        except Invalid as exc:
            return Problem(describe(exc))
