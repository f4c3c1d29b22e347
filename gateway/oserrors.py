"""What an OS error at start-up means to the operator who must fix it.

A bind that fails says which socket (listener name and address, or the admin
endpoint), the kernel's words, and, for the causes an operator meets in
practice, what to change. The messages go to a one-line log entry, never a
traceback (cli.py: start-up failures).
"""

from __future__ import annotations

import errno

from gateway.plugin_manager import PluginError

_HINTS = {
    errno.EADDRINUSE: "another process holds it (ss -ltnp or ss -lunp shows which)",
    errno.EADDRNOTAVAIL: "the address is not on this host "
    "(transparent = true binds a non-local address for TPROXY)",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EPERM: "transparent sockets need CAP_NET_ADMIN",
}


def bind_error(what: str, exc: OSError) -> OSError:
    """``exc`` with ``what`` (e.g. ``listener public (0.0.0.0:80)``) and a hint in its message.

    Args:
        what: the socket, as the operator names it in the config.
        exc: the error from ``bind``/``listen``/``setsockopt``.
    """
    hint = _HINTS.get(exc.errno or 0)
    text = f"{what}: {exc.strerror or exc}" + (f" ({hint})" if hint else "")
    return OSError(exc.errno, text)


def startup_failures(exc: BaseException) -> list[str] | None:
    """The one-line messages of a start-up that failed on expected OS or plugin
    errors, or None when ``exc`` holds anything else (a bug: keep its traceback).

    trio wraps an error raised inside nurseries in exception groups; the leaves are
    what the operator needs.
    """
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(exc)
    if not leaves or not all(isinstance(e, OSError | PluginError) for e in leaves):
        return None
    return list(dict.fromkeys(str(e) for e in leaves))
