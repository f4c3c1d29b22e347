"""gateway/schema.py: secrets read from files (``*_file`` keys)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway import schema as s
from gateway.config import ConfigError, from_dict
from gateway.redact import redact_config

GOOD = """
[[listener]]
name = "public"
bind = "127.0.0.1:1"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:2"]
"""


def admin(text: str) -> str:
    return GOOD + '\n[admin]\nbind = "127.0.0.1:9901"\n' + text


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_dict(tomllib.loads(text), "t.toml", {})
    return info.value.problems


@pytest.mark.parametrize(
    "content,token",
    [("s3cret\n", "s3cret"), ("s3cret\r\n", "s3cret"), ("s3cret", "s3cret"), ("a b\n\n", "a b\n")],
)
def test_token_file_strips_one_trailing_newline(tmp_path: Path, content: str, token: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    config = from_dict(tomllib.loads(admin(f'token_file = "{path}"\n')), "t.toml", {})
    assert config.admin is not None and config.admin.token == token


def test_a_secret_file_that_cannot_be_used_is_a_problem_naming_key_and_file(
    tmp_path: Path,
) -> None:
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.write_text("\n")
    assert problems(admin(f'token_file = "{empty}"\n')) == [f'admin.token_file: "{empty}" is empty']
    assert problems(admin(f'token_file = "{missing}"\n')) == [
        f'admin.token_file: cannot read "{missing}": No such file or directory'
    ]
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    assert problems(admin(f'token_file = "{tmp_path / "bin"}"\n')) == [
        f'admin.token_file: "{tmp_path / "bin"}" is not UTF-8 text'
    ]


def test_a_value_and_its_file_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file")
    found = problems(admin(f'token = "inline"\ntoken_file = "{path}"\n'))
    assert found == ["admin.token_file: give token or token_file, not both"]


def test_a_secret_file_shows_as_its_path_never_its_value(tmp_path: Path) -> None:
    path = tmp_path / "url"
    path.write_text("redis://:hunter2@127.0.0.1/0")
    secret = s.secret_file()(str(path))
    assert secret.value == "redis://:hunter2@127.0.0.1/0"
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert redact_config({"redis_url_file": secret}) == {"redis_url_file": str(path)}
    assert redact_config({"token_file": str(path)}) == {"token_file": str(path)}


def test_a_content_problem_names_the_file_and_never_quotes_it(tmp_path: Path) -> None:
    def url(text: str) -> str:
        if not text.startswith("redis://"):
            raise s.Invalid("not a redis:// URL")
        return text

    path = tmp_path / "url"
    path.write_text("http://:hunter2@host")
    with pytest.raises(s.Invalid) as info:
        s.secret_file(url)(str(path))
    assert info.value.problems == [("", f'in "{path}": not a redis:// URL')]
