"""gateway/config.py: the rules for ``[plugin.<name>]`` sections.

* A plugin's required key does not make its section mandatory: a file that never
  mentions the plugin leaves it not configured (``config.plugin(name)`` empty).
* A section of a plugin that ``[gateway] disable_plugins`` names is ignored with a
  note, not an error; a section nobody declares is still an error.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway import Field, schema
from gateway.config import ConfigError, from_dict

from gwproc import l4gw

BASE = """
[[listener]]
name = "public"
bind = "127.0.0.1:8080"
"""

FEED = {
    "url": Field(schema.string, doc="where the list comes from"),
    "every": Field(schema.duration, 60.0, "how often it is fetched"),
}
"""A schema with a required key."""
OPTIONAL = {"level": Field(schema.integer(0, 9), 3, "a setting with a default")}


def load(text: str, **schemas: schema.Schema) -> object:
    return from_dict(tomllib.loads(BASE + text), "t.toml", schemas)


def problems(text: str, **schemas: schema.Schema) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load(text, **schemas)
    return err.value.problems


def test_a_required_key_does_not_make_the_section_mandatory() -> None:
    config = from_dict(tomllib.loads(BASE), "t.toml", {"feed": FEED, "opt": OPTIONAL})
    assert config.plugin("feed") == {}
    assert "feed" not in config.plugins
    # A schema without required keys still gets its defaults when absent.
    assert config.plugin("opt") == {"level": 3}
    assert config.notes == ()


def test_a_present_section_is_checked_in_full() -> None:
    assert problems('[plugin.feed]\nevery = "5s"\n', feed=FEED) == ["plugin.feed.url: required"]
    assert problems("[plugin.feed]\n", feed=FEED) == ["plugin.feed.url: required"]
    config = from_dict(
        tomllib.loads(BASE + '[plugin.feed]\nurl = "https://example.org/list"\n'),
        "t.toml",
        {"feed": FEED},
    )
    assert config.plugin("feed") == {"url": "https://example.org/list", "every": 60.0}


def test_a_disabled_plugins_section_is_ignored_with_a_note() -> None:
    text = '[gateway]\ndisable_plugins = ["geo_deny"]\n\n[plugin.geo_deny]\ndeny = ["nope"]\n'
    config = from_dict(tomllib.loads(BASE + text), "t.toml", {"opt": OPTIONAL})
    assert "geo_deny" not in config.plugins
    assert config.notes == (
        "plugin.geo_deny: ignored: the plugin is disabled ([gateway] disable_plugins)",
    )


def test_a_section_nobody_declares_is_still_an_error() -> None:
    text = '[gateway]\ndisable_plugins = ["geo_deny"]\n\n[plugin.gep_deny]\ndeny = []\n'
    assert problems(text) == ["plugin.gep_deny: no installed plugin declares this section"]
    assert problems("[plugin.nobody]\nx = 1\n") == [
        "plugin.nobody: no installed plugin declares this section"
    ]


def test_a_broken_gateway_section_adds_no_problem_per_disabled_section() -> None:
    text = '[gateway]\ndisable_plugins = ["geo_deny"]\nworkers = 0\n\n[plugin.geo_deny]\n'
    assert problems(text) == ["gateway.workers: must be at least 1, got 0"]


def test_a_disabled_plugin_that_still_declares_its_section_is_checked() -> None:
    """Disabling takes effect when plugins load; a schema that is loaded applies."""
    text = '[gateway]\ndisable_plugins = ["opt"]\n\n[plugin.opt]\nlevel = 10\n'
    assert problems(text, opt=OPTIONAL) == ["plugin.opt.level: must be at most 9, got 10"]


# --- through the command, as an operator meets it -------------------------------------


def test_check_accepts_a_disabled_plugins_section(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        BASE
        + '[gateway]\ndisable_plugins = ["ratelimit"]\n\n'
        + '[plugin.ratelimit]\nper_client = { rate = 20, per = "1s" }\n'
    )
    out = l4gw("check", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_check_still_refuses_the_section_of_an_enabled_plugin_it_does_not_know(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(BASE + "[plugin.ratelimitt]\nper_client = {}\n")
    out = l4gw("check", "-c", str(path))
    assert out.returncode == 2
    assert "plugin.ratelimitt: no installed plugin declares this section" in out.stderr
