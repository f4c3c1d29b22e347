"""The relay tiers: how an established flow's bytes move (copy in userspace,
splice(2) through pipes, or the eBPF sockmap), the policy that picks a tier, and
the per-process tiers the ``relay`` plugin drives.

Semi-public, as ``trio.lowlevel`` is: a plugin may import the modules
``__all__`` lists (the built-in ``relay`` plugin is a thin hook adaptor over
``policy`` and ``tiers``; a relay plugin of your own can build on ``copy``,
``splice`` and ``sockmap``). They change less often than the core's private
modules, and never silently: a change is called out with the release. The
other modules here (the libbpf binding, the sockmap canary, the start-up probe)
are their internals. What every plugin needs of this package (``RelayStats``,
``RelayReset``, ``both_directions``, ``abort_on_close``) is re-exported by
``gateway`` itself.
"""

__all__ = ["copy", "policy", "sockmap", "splice", "stats", "tiers"]
