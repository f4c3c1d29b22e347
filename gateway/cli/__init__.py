"""The ``l4gw`` command (``gateway.cli.main``): the top floor, imported by nothing else
in the package. ``python -m gateway.cli`` runs it too."""
