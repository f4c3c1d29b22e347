"""gateway/redact.py: URL credentials masked by parsing, wherever a value can be shown."""

from __future__ import annotations

import io
import logging
import tomllib
from urllib.parse import quote

import pytest
import trio
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.config import ConfigError, from_dict
from gateway.redact import (
    REDACTED,
    RedactingFilter,
    redact_config,
    redact_text,
    redact_url,
)
from l4gw_plugins.ratelimit.plugin import SCHEMA as RATELIMIT_SCHEMA
from l4gw_plugins.ratelimit.redis import RedisBuckets, RedisSettings

from gwproc import free_port


@pytest.mark.parametrize(
    "url,expected",
    [
        ("redis://user:hunter2@127.0.0.1:6379/0", f"redis://user:{REDACTED}@127.0.0.1:6379/0"),
        # "@" and ":" in the password: the userinfo ends at the last "@".
        ("redis://user:p@ss@host:6379/0", f"redis://user:{REDACTED}@host:6379/0"),
        ("redis://user:p:a@s:s@host/0", f"redis://user:{REDACTED}@host/0"),
        ("redis://:secret@host", f"redis://:{REDACTED}@host"),
        ("rediss://:pw@[::1]:6380", f"rediss://:{REDACTED}@[::1]:6380"),
        # Percent-encoded: the raw text goes, nothing is decoded.
        ("redis://user:p%40ss%2Fw@host/1", f"redis://user:{REDACTED}@host/1"),
        # A user name alone is a token.
        ("https://ghp_TOKEN@github.com/org/repo", f"https://{REDACTED}@github.com/org/repo"),
        # Unescaped "/", "?", "#", "[" in a password: still masked whole.
        ("redis://u:pa/ss@host:1/0", f"redis://u:{REDACTED}@host:1/0"),
        ("redis://u:pa?ss@host:1/0", f"redis://u:{REDACTED}@host:1/0"),
        ("redis://u:pa#ss@host:1/0", f"redis://u:{REDACTED}@host:1/0"),
        ("redis://u:p[a]ss@host:1/0", f"redis://u:{REDACTED}@host:1/0"),
        ("redis://u:pa ss@host", f"redis://u:{REDACTED}@host"),
        # Nothing secret: unchanged.
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user:@host", "redis://user:@host"),
        ("127.0.0.1:9001", "127.0.0.1:9001"),
        ("user:pw@host", "user:pw@host"),  # no scheme: no URL
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


SCHEMES = st.sampled_from(["redis", "rediss", "http", "https", "postgres+psycopg", "amqp"])
HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
)
# A user name cannot hold ":" (the first ":" of the userinfo ends it).
USERS = st.text(st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), max_size=12)
PASSWORDS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
PASSWORDS_WITH_DELIMITERS = st.lists(
    st.one_of(st.sampled_from(list("@:/%#?[] \t")), PASSWORDS), min_size=1, max_size=8
).map("".join)


@given(
    scheme=SCHEMES,
    user=USERS,
    password=st.one_of(PASSWORDS, PASSWORDS_WITH_DELIMITERS),
    host=HOSTS,
    port=st.integers(1, 65535),
    db=st.integers(0, 15),
)
def test_a_password_never_appears_and_the_host_stays(
    scheme: str, user: str, password: str, host: str, port: int, db: int
) -> None:
    skeleton = f"{scheme}://{user}:{REDACTED}@{host}:{port}/{db}"
    for written in (password, quote(password, safe="")):
        url = f"{scheme}://{user}:{written}@{host}:{port}/{db}"
        out = redact_url(url)
        assert out == skeleton
        assert redact_config({"redis_url": url}) == {"redis_url": skeleton}
        # A password that is part of the skeleton (say "6379") is not a leak.
        if password not in skeleton:
            assert password not in out
        if written not in skeleton:
            assert written not in out


@given(scheme=SCHEMES, token=USERS.filter(bool), host=HOSTS)
def test_a_lone_user_name_is_masked(scheme: str, token: str, host: str) -> None:
    out = redact_url(f"{scheme}://{token}@{host}/x")
    assert out == f"{scheme}://{REDACTED}@{host}/x"


@given(
    user=USERS.filter(lambda u: not any(c.isspace() for c in u)),
    password=PASSWORDS.filter(lambda p: not any(c.isspace() for c in p)),
    host=HOSTS,
)
def test_urls_in_free_text(user: str, password: str, host: str) -> None:
    """A log line or error message quoting a URL (here the password holds no white
    space, which ends a URL in free text)."""
    text = f'plugin.x.url: cannot use "redis://{user}:{password}@{host}:6379/0"; see docs'
    out = redact_text(text)
    assert out == f'plugin.x.url: cannot use "redis://{user}:{REDACTED}@{host}:6379/0"; see docs'
    assume(password not in out)
    assert password not in out


def test_free_text_with_several_urls() -> None:
    text = "a redis://u:p1@h1:1/0, b https://t0k@h2/x and c http://h3/ ok"
    assert redact_text(text) == (
        f"a redis://u:{REDACTED}@h1:1/0, b https://{REDACTED}@h2/x and c http://h3/ ok"
    )


def test_redact_config() -> None:
    raw = {
        "admin": {"bind": "127.0.0.1:9901", "token": "t0p"},
        "plugin": {
            "ratelimit": {
                "redis_url": "redis://user:hunter2@127.0.0.1:6379/0",
                "fallback": ["rediss://:pw@[::1]:6380", "redis://127.0.0.1:6379"],
                "mirror": "redis://user:p@ss-word@10.0.0.1:6379/0",
                "redis_password": "hunter2",
                "api_key": "k",
                "client_secret": "s",
                "tokens": ["a", "b"],
                "per_client": 10,
                "empty_token": "",
            }
        },
        "cluster": {"api": {"endpoints": ["127.0.0.1:9001"]}},
    }
    out = redact_config(raw)
    assert out["admin"] == {"bind": "127.0.0.1:9901", "token": REDACTED}
    rl = out["plugin"]["ratelimit"]
    assert rl["redis_url"] == f"redis://user:{REDACTED}@127.0.0.1:6379/0"
    assert rl["fallback"] == [f"rediss://:{REDACTED}@[::1]:6380", "redis://127.0.0.1:6379"]
    assert rl["mirror"] == f"redis://user:{REDACTED}@10.0.0.1:6379/0"
    assert rl["redis_password"] == rl["api_key"] == rl["client_secret"] == REDACTED
    assert rl["tokens"] == [REDACTED, REDACTED]
    assert rl["per_client"] == 10
    assert rl["empty_token"] == ""
    assert out["cluster"] == raw["cluster"]
    assert "hunter2" not in repr(out) and "t0p" not in repr(out) and "ss-word" not in repr(out)
    # The original is not touched.
    assert raw["admin"]["token"] == "t0p"


def test_the_log_filter_masks_every_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(f"test_redact.{id(stream)}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connect to %s failed (%d%%)", "redis://u:p@ss@10.0.0.1:6379/0", 100)
        logger.warning("no url here: %s", "p@ss")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == (
        f"connect to redis://u:{REDACTED}@10.0.0.1:6379/0 failed (100%)\nno url here: p@ss\n"
    )


def test_config_errors_never_quote_a_password() -> None:
    """Any problem quoting a value is redacted, whichever converter wrote it."""
    text = """
[[listener]]
name = "l"
bind = "127.0.0.1:1"

[[route]]
listener = "l"
cluster = "c"

[cluster.c]
endpoints = ["redis://admin:hunter2@10.0.0.1:6379"]

[plugin.ratelimit]
redis_url = "redis://admin:hunter2@10.0.0.1:99999/0"
"""
    with pytest.raises(ConfigError) as info:
        from_dict(tomllib.loads(text), "t.toml", {"ratelimit": RATELIMIT_SCHEMA})
    report = info.value.report()
    assert "hunter2" not in report and "hunter2" not in str(info.value)
    assert f"redis://admin:{REDACTED}@10.0.0.1:6379" in report
    assert 'plugin.ratelimit.redis_url: invalid port "99999"' in report


@pytest.mark.timeout(30)
async def test_redis_backend_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens: the connect fails and the outage is logged
    text = f"""
[[listener]]
name = "l"
bind = "127.0.0.1:1"

[[route]]
listener = "l"
cluster = "c"

[cluster.c]
endpoints = ["127.0.0.1:2"]

[plugin.ratelimit]
backend = "redis"
redis_url = "redis://gw:p%40ss-hunter2@127.0.0.1:{port}/0"
redis_timeout = "2s"
"""
    config = from_dict(tomllib.loads(text), "t.toml", {"ratelimit": RATELIMIT_SCHEMA})
    settings = RedisSettings.from_config(config.plugin("ratelimit"))
    caplog.set_level(logging.INFO, logger="l4gw.ratelimit")
    buckets = RedisBuckets(settings)
    assert buckets.address.password == "p@ss-hunter2"
    with trio.fail_after(10):
        await buckets._warm_up()
    assert buckets.outages == 1
    text = caplog.text
    assert f"127.0.0.1:{port}" in text
    assert "hunter2" not in text and "p@ss" not in text
