"""plugins/ratelimit/redis_schema.py: the Redis keys' problems, found by ``l4gw check``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from gateway.config import ConfigError
from l4gw_plugins.ratelimit.plugin import RateLimit
from l4gw_plugins.ratelimit.redis import RedisSettings

import ratelimit_setup


def section(text: str) -> dict[str, Any]:
    return ratelimit_setup.section('backend = "redis"\n' + text)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        section(text)
    return info.value.problems


@pytest.fixture
def client_cert(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(certificate, key encrypted with the passphrase in the third file)."""
    ca = trustme.CA()
    cert = ca.issue_cert("client.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"k3y-pass"),
    )
    (tmp_path / "client.key").write_bytes(encrypted)
    (tmp_path / "pass").write_text("k3y-pass\n")
    return tmp_path / "client.pem", tmp_path / "client.key", tmp_path / "pass"


def test_tls_with_an_encrypted_key_and_its_passphrase_file(tmp_path: Path, client_cert) -> None:
    cert, key, password = client_cert
    tls = (
        f'redis_url = "rediss://127.0.0.1:6380/0"\n'
        f'redis_tls = {{ cert_file = "{cert}", key_file = "{key}", '
        f'key_password_file = "{password}", server_name = "redis.test" }}\n'
    )
    settings = RedisSettings.from_config(section(tls))
    assert settings.tls is not None and settings.tls.server_name == "redis.test"
    assert "k3y-pass" not in repr(settings)
    password.write_text("n0t-the-pass")
    found = problems(tls)
    assert len(found) == 1 and found[0].startswith(
        f'plugin.ratelimit.redis_tls: cert_file "{cert}" and "{key}": not a PEM certificate'
    ), found
    assert "n0t-the-pass" not in found[0]


def test_redis_key_problems(tmp_path: Path) -> None:
    assert problems('redis_tls = { ca_file = "/nonexistent/ca.pem" }\n') == [
        'plugin.ratelimit.redis_tls.ca_file: cannot read "/nonexistent/ca.pem": '
        "No such file or directory"
    ]
    assert problems('redis_sentinel = { service = "m", sentinels = ["a:b"] }\n') == [
        'plugin.ratelimit.redis_sentinel.sentinels[0]: invalid port "b" (1 to 65535)'
    ]
    url = tmp_path / "url"
    url.write_text("redis://:hunter2@127.0.0.1:0/0")
    found = problems(f'redis_url_file = "{url}"\n')
    assert found == [f'plugin.ratelimit.redis_url_file: in "{url}": invalid port "0" (1 to 65535)']
    both = problems(f'redis_url = "redis://h/0"\nredis_url_file = "{url}"\n')
    assert "plugin.ratelimit.redis_url_file: give redis_url or redis_url_file, not both" in both


def test_sentinels_and_the_url_from_a_file(tmp_path: Path) -> None:
    url = tmp_path / "url"
    url.write_text("redis://app:pw@ignored:1/3\n")
    values = section(
        f'redis_url_file = "{url}"\n'
        'redis_sentinel = { service = "mymaster", sentinels = ["s1.redis", "[::1]:26380"] }\n'
    )
    settings = RedisSettings.from_config(values)
    assert settings.url == "redis://app:pw@ignored:1/3"
    assert settings.sentinels is not None
    assert settings.sentinels.addresses == (("s1.redis", 26379), ("::1", 26380))


def test_tls_options_need_a_rediss_url(tmp_path: Path) -> None:
    rl = RateLimit()
    values = section('redis_url = "redis://127.0.0.1/0"\nredis_tls = { server_name = "x" }\n')
    with pytest.raises(ValueError, match="redis_tls: TLS needs a rediss:// URL"):
        rl.configure(values)
