import json

import pytest
from aiohttp import web

from fleetkeeper.core.domain import Names
from fleetkeeper.core.errors import ConfigError, Temporary
from fleetkeeper.netacct.pods import FilePodSource, HttpPodSource, parse_items, retry_delay
from fleetkeeper.netacct.settings import RateError, load_settings, make_settings, parse_rate


@pytest.mark.parametrize("text,bps", [("100mbit", 100_000_000), ("1.5gbit", 1_500_000_000), ("500kbit", 500_000),
                                      ("10mbps", 80_000_000), (" 8Mbit ", 8_000_000)])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text,why", [("100", "not a rate"), ("fast", "not a rate"), ("10furlong", "unknown unit"),
                                      ("1bit", "out of range"), ("-5mbit", "not a rate"), (100, "expected")])
def test_parse_rate_rejects(text, why):
    with pytest.raises(RateError, match=why):
        parse_rate(text)


def test_settings_errors_name_field_value_and_rule(tmp_path):
    with pytest.raises(ConfigError) as ei:
        make_settings("cfg.yaml", {"node": "n", "internal_ranges": ["10.0.0.1/8"], "interval_s": 0,
                                   "team_limits": {"vision": "lots"}, "bogus": 1})
    paths = {p for p, _v, _m in ei.value.problems}
    assert {"internal_ranges", "interval_s", "team_limits", "bogus"} <= paths
    msg = str(ei.value)
    assert "host bits set" in msg and "vision" in msg


def test_settings_defaults_and_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("node: n1\ninternal_ranges: [10.0.0.0/8, 172.16.0.0/12]\n")
    st = load_settings(f, {"uplink": "eth0"})
    assert [str(n) for n in st.internal_ranges] == ["10.0.0.0/8", "172.16.0.0/12"]
    assert st.max_buckets == 0xFFF and st.uplink == "eth0"
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="either pods_file or relay_url"):
        make_settings("x", {"node": "n", "pods_file": "/a", "relay_url": "http://r"})


NAMES = Names()


def _doc():
    return {"items": [
        {"namespace": "ml", "name": "a", "ip": "10.1.0.2", "labels": {NAMES.team: "vision"},
         "annotations": {NAMES.egress_limit: "10mbit"}},
        {"namespace": "ml", "name": "pending", "ip": ""},
        {"namespace": "ml", "name": "v6", "ip": "fd00::1"},
        {"namespace": "Bad_NS", "name": "x", "ip": "10.1.0.9"},
        {"namespace": "ml", "name": "dup", "ip": "10.1.0.2"},
        {"namespace": "ml", "name": "badteam", "ip": "10.1.0.7", "labels": {NAMES.team: "has space"}},
        "junk",
    ]}


def test_parse_items_skips_bad_entries_with_reasons():
    res = parse_items(_doc(), NAMES)
    assert [(p.key, p.ip, p.team) for p in res.pods] == [("ml/a", "10.1.0.2", "vision")]
    reasons = dict(res.skipped)
    assert "no pod IP" in reasons["ml/pending"] and "IPv6" in reasons["ml/v6"]
    assert "also used by" in reasons["ml/dup"] and "label value" in reasons["ml/badteam"]
    assert "DNS-1123" in reasons["Bad_NS/x"] and reasons["items[6]"] == "not an object"
    with pytest.raises(ValueError):
        parse_items({"pods": []}, NAMES)


async def test_file_source(tmp_path):
    f = tmp_path / "pods.json"
    src = FilePodSource(f, NAMES)
    with pytest.raises(Temporary):
        await src.list()
    f.write_text(json.dumps(_doc()))
    assert [p.name for p in await src.list()] == ["a"]
    f.write_text("{not json")
    with pytest.raises(Temporary, match="pods.json"):
        await src.list()


async def test_http_source(aiohttp_unused_port=None):
    calls = []

    async def handler(request):
        calls.append(request.match_info["node"])
        if request.match_info["node"] == "broken":
            return web.Response(status=503, text="relay warming up")
        if request.match_info["node"] == "behind":
            return web.Response(status=503, text="relay behind", headers={"Retry-After": "12"})
        return web.json_response(_doc())

    webapp = web.Application()
    webapp.router.add_get("/v1/nodes/{node}/pods", handler)
    runner = web.AppRunner(webapp)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        src = HttpPodSource(f"http://127.0.0.1:{port}/", "node-1", NAMES)
        assert [p.key for p in await src.list()] == ["ml/a"]
        bad = HttpPodSource(f"http://127.0.0.1:{port}", "broken", NAMES)
        with pytest.raises(Temporary, match="503") as ei:
            await bad.list()
        assert ei.value.delay == 5.0
        # a relay that is behind says when to come back: the agent waits at least that long
        behind = HttpPodSource(f"http://127.0.0.1:{port}", "behind", NAMES)
        with pytest.raises(Temporary, match="503") as ei:
            await behind.list()
        assert 12.0 <= ei.value.delay < 24.0
        await src.close()
        await bad.close()
        await behind.close()
        assert calls == ["node-1", "broken", "behind"]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status,header,u,want", [(503, "10", 0.0, 10.0), (503, "10", 0.5, 15.0), (503, None, 0.5, 5.0),
                                                  (503, "soon", 0.5, 5.0), (500, "10", 0.5, 5.0)])
def test_retry_delay_follows_the_relays_retry_after(status, header, u, want):
    assert retry_delay(status, header, u) == want
