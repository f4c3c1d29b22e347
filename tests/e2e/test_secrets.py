"""Secrets read from files (``[admin] token_file``), as a mounted Kubernetes Secret
provides them, through a real ``l4gw run``: the token guards the admin endpoint,
never shows in ``/config``, and a new file plus a reload applies the new token."""

from __future__ import annotations

import json
import os

import pytest

from adminhttp import aget
from backends import echo_server
from gwproc import free_port

pytestmark = pytest.mark.timeout(60)


async def test_token_file_guards_the_admin_endpoint_and_a_reload_rotates_it(
    nursery, gateway, tmp_path
):
    backend = await nursery.start(echo_server)
    port, admin = free_port(), free_port()
    first, second = f"first-{os.urandom(8).hex()}", f"second-{os.urandom(8).hex()}"
    secret = tmp_path / "secrets" / "admin-token"
    secret.parent.mkdir()
    secret.write_text(first + "\n")  # as `echo` or kubectl writes it
    gw = gateway(
        f"""
[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[admin]
bind = "127.0.0.1:{admin}"
token_file = "{secret}"
"""
    )
    assert (await aget(admin, "/config", None))[0] == 401
    assert (await aget(admin, "/config", first + "x"))[0] == 401
    assert (await aget(admin, "/readyz", None))[0] == 200  # probes need no token
    status, body = await aget(admin, "/config", first)
    assert status == 200
    assert first.encode() not in body
    document = json.loads(body)["config"]
    assert document["admin"]["token_file"] == str(secret)
    assert document["admin"]["token"] == ""
    # Defaults filled in, every plugin section present.
    assert document["gateway"]["drain_timeout"] == "30s"
    assert document["admin"]["max_connections"] == 16
    assert document["plugin"]["ratelimit"]["redis_lease"] == 5

    # A Kubernetes Secret update swaps a symlink: a new file replaces the old.
    new = tmp_path / "secrets" / "admin-token.new"
    new.write_text(second)
    new.replace(secret)
    assert gw.reload()
    assert (await aget(admin, "/config", first))[0] == 401
    status, body = await aget(admin, "/config", second)
    assert status == 200 and second.encode() not in body and first.encode() not in body

    # An unreadable secret is a failed reload naming key and file; the token stays.
    secret.write_text("")
    assert not gw.reload()
    assert f'admin.token_file: "{secret}" is empty' in gw.log
    assert (await aget(admin, "/config", second))[0] == 200
    assert second not in gw.log and first not in gw.log
