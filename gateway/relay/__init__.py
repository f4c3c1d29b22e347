"""The relay tiers: how an established flow's bytes move (copy in userspace,
splice(2) through pipes, or the eBPF sockmap), with the libbpf binding the
sockmap tier loads its program through.

Semi-public, as ``trio.lowlevel`` is: a relay plugin may import its modules
(``gateway.relay.copy``, ``gateway.relay.splice``, ``gateway.relay.sockmap``);
they change less often than the core's private modules, and a change is noted
in the changelog.
"""
