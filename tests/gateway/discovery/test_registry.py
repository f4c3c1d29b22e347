"""The endpoint registry: combination, change detection, reload, files, the plugin API."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import discovery
from gateway.config import Config, Endpoint
from gateway.discovery import DiscoveryError, Registry
from gateway.discovery import files as files_mod
from gateway.testing import make_config

pytestmark = pytest.mark.timeout(30)

E1, E2, E3 = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)


def config(clusters: str) -> Config:
    return make_config(
        '[[route]]\nlistener = "public"\ncluster = "api"\n' + clusters,
    )


class Changes:
    def __init__(self, registry: Registry) -> None:
        self.seen: list[tuple[str, tuple[Endpoint, ...]]] = []
        registry.subscribe(lambda c, e: self.seen.append((c, e)))


def test_literal_clusters_are_their_config_and_log_nothing(caplog: Any) -> None:
    r = Registry()
    changes = Changes(r)
    cfg = config('[cluster.api]\nendpoints = ["10.0.0.1:80", "10.0.0.1:80"]\n')
    with caplog.at_level(logging.INFO, "l4gw.discovery"):
        r.configure(cfg)
    # Literal endpoints stay as written (a repeat is a retry on purpose).
    assert r.current(cfg.clusters["api"]) == (E1, E1)
    assert r.endpoints("api")[0].origin == "literal"
    assert not changes.seen and not caplog.records


def test_current_answers_only_for_the_config_it_was_given() -> None:
    r = Registry()
    r.configure(config('[cluster.api]\ndiscovery = "k8s"\n'))
    other = config('[cluster.api]\nendpoints = ["10.0.0.3:80"]\n')
    assert r.current(other.clusters["api"]) == (E3,)
    assert r.endpoints("nope") == ()


def test_plugin_publishes_whole_sets_and_each_change_is_one_line(caplog: Any) -> None:
    r = Registry()
    changes = Changes(r)
    r.configure(config('[cluster.api]\ndiscovery = "k8s"\n'))
    assert r.endpoints("api") == ()
    with caplog.at_level(logging.INFO, "l4gw.discovery"):
        assert r.publish("api", [E1, E2], source="k8s")
        assert r.publish("api", [E2, E1][::-1], source="k8s")  # same set: no change
        assert r.publish("api", [E2, E3], source="k8s")
    assert [e for _, e in changes.seen] == [(E1, E2), (E2, E3)]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "discovery: cluster api: 2 endpoints, added 10.0.0.1:80, 10.0.0.2:80, removed -",
        "discovery: cluster api: 2 endpoints, added 10.0.0.3:80, removed 10.0.0.1:80",
    ]
    assert {e.origin for e in r.endpoints("api")} == {"plugin"}
    assert {e.source for e in r.endpoints("api")} == {"k8s"}
    assert r.version("api") == 2 and r.changes == 2


def test_an_empty_set_is_logged_as_a_warning(caplog: Any) -> None:
    r = Registry()
    r.configure(config('[cluster.api]\ndiscovery = "k8s"\n'))
    r.publish("api", [E1], source="k8s")
    with caplog.at_level(logging.INFO, "l4gw.discovery"):
        r.publish("api", [], source="k8s")
    assert [x.levelname for x in caplog.records] == ["INFO", "WARNING"]
    assert "has no endpoints" in caplog.records[1].getMessage()


def test_a_plugin_the_cluster_does_not_name_is_kept_apart(caplog: Any) -> None:
    r = Registry()
    r.configure(config('[cluster.api]\ndiscovery = "k8s"\n'))
    with caplog.at_level(logging.WARNING, "l4gw.discovery"):
        assert not r.publish("api", [E1], source="consul")
        assert not r.publish("api", [E2], source="consul")
        assert not r.publish("other", [E2], source="k8s")
    assert r.endpoints("api") == ()
    assert len(caplog.records) == 2  # once per (cluster, plugin)
    # A reload that names it uses the set at once.
    r.configure(config('[cluster.api]\ndiscovery = "consul"\n'))
    assert r.endpoints("api") == (E2,)


def test_publish_refuses_what_is_not_an_endpoint() -> None:
    r = Registry()
    r.configure(config('[cluster.api]\ndiscovery = "k8s"\n'))
    with pytest.raises(DiscoveryError, match="not an Endpoint"):
        r.publish("api", ["10.0.0.1:80"], source="k8s")  # type: ignore[list-item]
    with pytest.raises(DiscoveryError, match=r"not an IP address: 'api\.internal'"):
        r.publish("api", [Endpoint("api.internal", 80)], source="k8s")
    with pytest.raises(DiscoveryError, match=r"port 1\.\.65535"):
        r.publish("api", [Endpoint("10.0.0.1", 0)], source="k8s")
    with pytest.raises(DiscoveryError, match="origin"):
        r.publish("api", [E1], source="k8s", origin="literal")


def test_combination_order_and_one_endpoint_per_address() -> None:
    r = Registry()
    r.configure(
        config('[cluster.api]\nendpoints = ["10.0.0.1:80", "a.internal:80", "b.internal:80"]\n')
    )
    # The follow tasks publish through the same API (no nursery here: by hand).
    heavy = Endpoint("10.0.0.1", 80, 5)
    assert r.publish("api", [E3], origin="name", source="b.internal:80")
    assert r.publish("api", [heavy, E2], origin="name", source="a.internal:80")
    got = r.endpoints("api")
    # Literal first, then names in config order; 10.0.0.1:80 once, the literal one.
    assert got == (E1, E2, E3)
    assert [e.origin for e in got] == ["literal", "name", "name"]
    assert got[1].source == "a.internal:80"


def test_the_same_address_by_another_route_is_no_change() -> None:
    r = Registry()
    changes = Changes(r)
    r.configure(config('[cluster.api]\nendpoints = ["a.internal:80", "b.internal:80"]\n'))
    r.publish("api", [E1], origin="name", source="a.internal:80")
    r.publish("api", [E1], origin="name", source="b.internal:80")
    r.publish("api", [], origin="name", source="a.internal:80")
    # E1 now comes from b: same set, no change, but /status says where from.
    assert len(changes.seen) == 1
    assert r.endpoints("api")[0].source == "b.internal:80"


def test_reload_keeps_the_sets_of_sources_that_stay() -> None:
    r = Registry()
    r.configure(config('[cluster.api]\nendpoints = ["a.internal:80", "b.internal:80"]\n'))
    r.publish("api", [E1], origin="name", source="a.internal:80")
    r.publish("api", [E2], origin="name", source="b.internal:80")
    changes = Changes(r)
    r.configure(
        config(
            '[cluster.api]\nendpoints = ["a.internal:80"]\nconnect_timeout = "3s"\n'
            '[cluster.web]\nendpoints = ["a.internal:80"]\n'
        )
    )
    # No empty window: a stays; b's set is gone with it.
    assert r.endpoints("api") == (E1,)
    assert changes.seen == [("api", (E1,))]


async def test_names_are_followed_and_a_reload_reuses_their_last_answer() -> None:
    """A real follow task (localhost: the system resolver answers it, no DNS server)."""
    r = Registry()
    dns = '[dns]\nfamily = "ipv4"\n'
    r.configure(config(dns + '[cluster.api]\nendpoints = ["localhost:9", "10.0.0.1:80"]\n'))
    local = Endpoint("127.0.0.1", 9)
    async with trio.open_nursery() as nursery:
        await r.start(nursery)  # waits for the first answer
        assert r.endpoints("api") == (E1, local)  # literal ones first
        assert r.endpoints("api")[1].origin == "name"
        assert r.endpoints("api")[1].source == "localhost:9"
        task = r._follows[next(iter(r._follows))]
        r.configure(
            config(
                dns + '[cluster.api]\nendpoints = ["localhost:9"]\n'
                '[cluster.web]\nendpoints = ["localhost:9"]\n'
            )
        )
        # The same task keeps running, and the new cluster has its answer at once.
        assert r._follows[next(iter(r._follows))] is task
        assert r.endpoints("web") == (local,)
        r.configure(config(dns + '[cluster.api]\nendpoints = ["10.0.0.1:80"]\n'))
        assert not r._follows and task.scope.cancel_called
        r.stop()


def test_srv_priorities_survive_combination() -> None:
    r = Registry()
    r.configure(config('[cluster.api]\nendpoints = [{ srv = "_api._tcp.internal" }]\n'))
    backup = Endpoint("10.0.0.9", 81, 1, 20)
    r.publish("api", [backup, E1], origin="srv", source="_api._tcp.internal")
    assert r.endpoints("api") == (backup, E1)
    assert r.endpoints("api")[0].priority == 20


def test_status_lists_every_endpoint_with_its_origin_and_health() -> None:
    r = Registry(clock=lambda: 1_700_000_000.0)
    r.configure(config('[cluster.api]\nendpoints = ["10.0.0.1:80", "b.internal:80"]\n'))
    r.publish("api", [E2], origin="name", source="b.internal:80")
    r.report_health(lambda cluster, e: "ejected" if e == E2 else "healthy")
    rows = r.status()["api"]["endpoints"]
    assert rows == [
        {
            "origin": "literal",
            "source": "",
            "address": "10.0.0.1:80",
            "weight": 1,
            "priority": 0,
            "health": "healthy",
            "updated": "2023-11-14T22:13:20Z",
        },
        {
            "origin": "name",
            "source": "b.internal:80",
            "address": "10.0.0.2:80",
            "weight": 1,
            "priority": 0,
            "health": "ejected",
            "updated": "2023-11-14T22:13:20Z",
        },
    ]


def test_the_module_api_is_the_process_registry() -> None:
    assert discovery.registry.endpoints("no-such-cluster") == discovery.endpoints("no-such-cluster")
    unsubscribe = discovery.subscribe(lambda c, e: None)
    unsubscribe()


# --- endpoints_file ----------------------------------------------------------------


def write_atomic(path: Path, items: list[Any] | str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(items if isinstance(items, str) else json.dumps(items))
    os.replace(tmp, path)


def test_file_parse_forms_and_problems() -> None:
    literals, names = files_mod.parse(
        '["10.0.0.1:80", {"address": "api.internal:81", "weight": 2},'
        ' {"srv": "_x._tcp.internal"}, "[fd00::1]:80"]'
    )
    assert literals == (E1, Endpoint("fd00::1", 80))
    assert [str(n) for n in names] == ["api.internal:81", "srv _x._tcp.internal"]
    with pytest.raises(files_mod.Invalid) as info:
        files_mod.parse('["10.0.0.1:80", {"address": "10.0.0.2:0"}, 7]')
    assert files_mod.describe(info.value) == (
        '[1].address: port 0 in "10.0.0.2:0": a backend needs the port it listens on; '
        '[2]: expected "ip:port", "name:port", {address = "...", weight = N} or '
        '{srv = "..."}, got an integer'
    )
    with pytest.raises(files_mod.Invalid, match="not valid JSON"):
        files_mod.parse('["10.0.0.1:80",')
    with pytest.raises(files_mod.Invalid, match="expected a JSON list"):
        files_mod.parse('{"endpoints": []}')


async def test_file_is_watched_bad_versions_keep_the_last_good_set(
    tmp_path: Path, caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files_mod, "POLL_INTERVAL", 0.05)
    path = tmp_path / "api.json"
    write_atomic(path, ["10.0.0.1:80"])
    r = Registry()
    changes = Changes(r)
    cfg = config(f'[cluster.api]\nendpoints_file = "{path}"\n')
    r.configure(cfg)
    assert changes.seen == [("api", (E1,))]  # a dynamic cluster's first set is a change
    assert r.endpoints("api") == (E1,)
    assert r.endpoints("api")[0].origin == "file"
    assert r.endpoints("api")[0].source == str(path)

    async def until(predicate: Any) -> None:
        with trio.fail_after(5):
            while not predicate():
                await trio.sleep(0.02)

    with caplog.at_level(logging.INFO, "l4gw.discovery"):
        async with trio.open_nursery() as nursery:
            await r.start(nursery)
            write_atomic(path, ["10.0.0.2:80", {"address": "10.0.0.3:80", "weight": 3}])
            await until(lambda: len(changes.seen) == 2)
            assert r.endpoints("api") == (E2, Endpoint("10.0.0.3", 80, 3))
            write_atomic(path, '["10.0.0.1:80", {"address": "nope:0"}]')
            await until(lambda: any(x.levelname == "ERROR" for x in caplog.records))
            await trio.sleep(0.3)  # several polls: still one line for this version
            path.unlink()
            await trio.sleep(0.3)
            write_atomic(path, ["10.0.0.1:80"])
            await until(lambda: len(changes.seen) == 3)
            r.stop()
    errors = [x.getMessage() for x in caplog.records if x.levelname == "ERROR"]
    assert errors == [
        f'discovery: {path}: [1].address: port 0 in "nope:0": a backend needs the port it '
        "listens on; keeping the last good endpoints",
        f"discovery: {path}: cannot read: No such file or directory; keeping the last good "
        "endpoints",
    ]
    assert r.endpoints("api") == (E1,)


def test_a_missing_file_at_start_is_an_empty_set(tmp_path: Path, caplog: Any) -> None:
    r = Registry()
    with caplog.at_level(logging.WARNING, "l4gw.discovery"):
        r.configure(config(f'[cluster.api]\nendpoints_file = "{tmp_path / "none.json"}"\n'))
    assert r.endpoints("api") == ()
    assert "no endpoints from it until it appears" in caplog.records[0].getMessage()


def test_metrics_count_endpoints_by_origin_and_changes() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    r = Registry(meter_provider=MeterProvider(metric_readers=[reader]))
    r.configure(config('[cluster.api]\nendpoints = ["10.0.0.1:80", "b.internal:80"]\n'))
    r.publish("api", [E2, E3], origin="name", source="b.internal:80")
    r.publish("api", [E2], origin="name", source="b.internal:80")

    points: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    points[(metric.name, tuple(sorted(p.attributes.items())))] = p.value
    by_origin = {
        dict(k[1])["l4gw.origin"]: v
        for k, v in points.items()
        if k[0] == "l4gw.discovery.endpoints"
    }
    assert by_origin == {"literal": 1, "name": 1, "srv": 0, "file": 0, "plugin": 0}
    # Configure (the first set of a dynamic cluster) and two publications.
    assert points[("l4gw.discovery.changes", (("l4gw.cluster", "api"),))] == 3


async def test_a_names_weight_goes_to_each_of_its_addresses() -> None:
    r = Registry()
    r.configure(
        config(
            '[dns]\nfamily = "any"\n'
            '[cluster.api]\nendpoints = [{ address = "localhost:9", weight = 3 }]\n'
        )
    )
    async with trio.open_nursery() as nursery:
        await r.start(nursery)
        got = r.endpoints("api")
        r.stop()
    # localhost is 127.0.0.1 (and ::1 where the hosts file says so): each weighs 3.
    assert Endpoint("127.0.0.1", 9, 3) in got
    assert {e.weight for e in got} == {3}
