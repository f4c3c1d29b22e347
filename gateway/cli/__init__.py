"""The ``l4gw`` command (``gateway.cli.main``, with the subcommands of ``tproxy`` and
``accel``, and what they share in ``common``): the top floor, imported by nothing else
in the package. ``python -m gateway.cli`` runs it too."""
