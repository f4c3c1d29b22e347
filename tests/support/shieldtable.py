"""A shield table of the test's own, installed as the process's for the test.

gateway/shield/table.py keeps the one installed table in a module global (the
admit path, the admin endpoint, the plugins and the metrics all read it), so a
test that puts entries in a table installs a fresh one and puts the previous
one back after, whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from gateway.shield import table


@contextmanager
def installed(fresh: table.Shield) -> Iterator[table.Shield]:
    """Install ``fresh`` for the block; then reinstall the previous table and close ``fresh``."""
    previous = table.installed()
    table.install(fresh)
    try:
        yield fresh
    finally:
        table.install(previous)
        fresh.close()
