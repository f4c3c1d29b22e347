"""``l4gw`` with SO_REUSEPORT on its listening sockets: the bench's stand-in for
a ``workers = N`` setting, so that N processes can share one port and the
kernel spreads new connections across them (by a hash of the 4-tuple).

Only the listening sockets change; everything else is ``l4gw`` as shipped.
Usage: ``python bench/reuseport_gateway.py run -c FILE`` (like ``l4gw``).
"""

from __future__ import annotations

import socket
import sys
import types

from gateway import listeners
from gateway.cli import main as cli


class _ReusePortSocket(socket.socket):
    def bind(self, address: tuple[str, int], /) -> None:  # type: ignore[override]
        self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().bind(address)


def _patch() -> None:
    # open_socket() looks up ``socket.socket`` in the listeners module's
    # globals; a copy of the socket module with one class swapped changes
    # exactly the listening sockets (upstream sockets come from upstream.py).
    shim = types.ModuleType("socket")
    shim.__dict__.update(socket.__dict__)
    shim.socket = _ReusePortSocket  # type: ignore[attr-defined]
    listeners.socket = shim  # type: ignore[attr-defined]


if __name__ == "__main__":
    _patch()
    sys.exit(cli.main(sys.argv[1:]))
