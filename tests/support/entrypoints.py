"""Test-only plugins installed the way a third-party plugin is: through an entry point.

A gateway process finds plugins in the ``l4gw.plugins`` entry-point group of the
distributions on its path. :func:`plugin_env` writes a one-entry distribution
(``*.dist-info`` with METADATA and entry_points.txt) for a module of
tests/testplugins/ and returns the PYTHONPATH that makes ``l4gw run`` see it, so a
test exercises the same discovery as an installed plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

TESTPLUGINS = Path(__file__).resolve().parent.parent / "testplugins"
"""Where the test-only plugin modules live."""


def plugin_env(tmp_path: Path, name: str, module: str) -> dict[str, str]:
    """The environment that installs plugin ``name`` (module ``module`` of tests/testplugins/).

    Args:
        tmp_path: The test's directory; the distribution goes under ``site/``.
        name: The entry point's name (the plugin's name in the config).
        module: The module the entry point names, e.g. ``"l4gw_test_tagger"``.

    Returns:
        ``{"PYTHONPATH": ...}``: the distribution, tests/testplugins/, then the
        PYTHONPATH this process has.
    """
    site = tmp_path / "site"
    dist = site / f"{module}-1.0.dist-info"
    dist.mkdir(parents=True)
    project = module.replace("_", "-")
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[l4gw.plugins]\n{name} = {module}\n")
    path = [str(site), str(TESTPLUGINS), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(path)}
