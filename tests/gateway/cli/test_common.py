"""gateway/cli/common.py: what the subcommands share; and the command line built from
gateway/cli/main.py, tproxy.py and accel.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from gateway.cli import main as cli_main
from gateway.cli.common import (
    EXIT_CONFIG,
    disabled_plugins,
    load_or_report,
    startup_failures,
)
from gateway.listeners import bind_error
from gateway.plugin_manager import PluginError


def test_bind_error_names_the_socket_and_hints_the_fix():
    err = bind_error("listener public (0.0.0.0:80)", OSError(errno.EADDRINUSE, "Address in use"))
    assert err.errno == errno.EADDRINUSE
    assert str(err).startswith("[Errno 98] listener public (0.0.0.0:80): Address in use (")
    assert "ss -ltnp" in str(err)
    plain = bind_error("admin endpoint (127.0.0.1:9)", OSError(errno.EINVAL, "Invalid argument"))
    assert str(plain).endswith("admin endpoint (127.0.0.1:9): Invalid argument")


def test_startup_failures_are_the_leaves_once_each():
    first = bind_error("listener a (127.0.0.1:1)", OSError(errno.EACCES, "Permission denied"))
    group = BaseExceptionGroup(
        "start", [first, BaseExceptionGroup("inner", [first, PluginError("plugin x: failed")])]
    )
    assert startup_failures(group) == [str(first), "plugin x: failed"]


def test_anything_else_is_a_bug_that_keeps_its_traceback():
    assert startup_failures(ExceptionGroup("start", [OSError(1, "x"), ValueError("bug")])) is None
    assert startup_failures(ValueError("bug")) is None


def test_disabled_plugins_is_read_before_validation(tmp_path: Path):
    path = tmp_path / "gw.toml"
    path.write_text('[gateway]\ndisable_plugins = ["telemetry", 3]\nnot_a_key = 1\n')
    assert disabled_plugins(str(path)) == ["telemetry"]
    path.write_text("[gateway\n")  # the full check reports it
    assert disabled_plugins(str(path)) == []


def test_load_or_report_prints_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "gw.toml"
    path.write_text('[[listener]]\nname = "a"\nbind = "nowhere"\n')
    assert load_or_report(str(path)) is None
    err = capsys.readouterr().err
    assert "listener[0].bind" in err


def test_the_command_line_has_every_subcommand(capsys: pytest.CaptureFixture[str]):
    assert cli_main.main([]) == EXIT_CONFIG  # no command: the help
    out = capsys.readouterr().out
    for command in ("run", "check", "demo", "plugins", "tproxy", "accel"):
        assert command in out


@pytest.mark.parametrize("command", ["tproxy", "accel", "shield"])
def test_a_command_without_its_action_prints_its_help(
    command: str, capsys: pytest.CaptureFixture[str]
):
    assert cli_main.main([command]) == EXIT_CONFIG
    out = capsys.readouterr().out
    assert f"usage: l4gw {command}" in out
