"""The proxy against a scripted upstream on loopback (no Prometheus needed)."""

from __future__ import annotations

import asyncio
import gzip
import time

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from fleetkeeper.core.errors import ConfigError
from fleetkeeper.promguard.policy import GuardPolicy
from fleetkeeper.promguard.proxy import Guard, ProxySettings, load_settings


class FakeProm:
    """Answers like Prometheus; with ``hold`` the metadata endpoints answer only once
    ``release`` is set (a deterministic slow upstream: no timing involved)."""

    def __init__(self, version: str = "2.42.0", n_series: int = 5, hold: bool = False):
        self.version = version
        self.n_series = n_series
        self.hold = hold
        self.release = asyncio.Event()
        self.seen: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.url = ""

    async def buildinfo(self, r: web.Request) -> web.Response:
        return web.json_response({"status": "success", "data": {"version": self.version}})

    async def series(self, r: web.Request) -> web.Response:
        params = list(r.query.items())
        if r.method == "POST":
            params += [(k, str(v)) for k, v in (await r.post()).items()]
        self.seen.append((r.method, r.path, params))
        self.started.set()
        try:
            if self.hold:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if any(k == "match[]" and v == "broken" for k, v in params):
            return web.json_response({"status": "error", "errorType": "bad_data", "error": "upstream says no"}, status=400)
        data = [{"__name__": "m", "i": str(i)} for i in range(self.n_series)]
        return web.json_response({"status": "success", "data": data})

    async def query(self, r: web.Request) -> web.StreamResponse:
        body = orjson.dumps({"status": "success", "data": {"resultType": "vector", "result": []},
                             "q": r.query.get("query")})
        if "gzip" in r.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(body), headers={"Content-Encoding": "gzip", "X-Upstream": "yes"},
                                content_type="application/json")
        return web.Response(body=body, content_type="application/json", headers={"X-Upstream": "yes"})

    async def echo(self, r: web.Request) -> web.Response:
        return web.Response(body=await r.read(), status=201, headers={"X-Method": r.method})

    async def __aenter__(self) -> "FakeProm":
        app = web.Application()
        app.router.add_get("/api/v1/status/buildinfo", self.buildinfo)
        app.router.add_route("*", "/api/v1/series", self.series)
        app.router.add_route("*", "/api/v1/labels", self.series)
        app.router.add_get("/api/v1/label/{name}/values", self.series)
        app.router.add_get("/api/v1/query", self.query)
        app.router.add_post("/api/v1/write", self.echo)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


class Running:
    def __init__(self, upstream: str, **policy):
        self.registry = CollectorRegistry()
        self.guard = Guard(ProxySettings(upstream=upstream, listen_port=0, policy=GuardPolicy(**policy)), self.registry)

    async def __aenter__(self) -> Guard:
        await self.guard.start()
        return self.guard

    async def __aexit__(self, *exc) -> None:
        await self.guard.stop()

    def count(self, endpoint: str, outcome: str) -> float:
        v = self.registry.get_sample_value(
            "fleetkeeper_promguard_requests_total", {"endpoint": endpoint, "outcome": outcome})
        assert v is not None
        return v


async def get(url: str, params=None, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, params=params, **kw) as r:
            return r.status, dict(r.headers), await r.read()


async def test_guarded_request_is_rewritten_and_answered():
    async with FakeProm() as up:
        run = Running(up.url)
        async with run as g:
            status, headers, raw = await get(f"{g.url}/api/v1/series", [("match[]", "m"), ("start", "0")])
    body = orjson.loads(raw)
    assert status == 200 and body["status"] == "success" and len(body["data"]) == 5
    method, path, params = up.seen[-1]
    assert (method, path) == ("POST", "/api/v1/series")
    keys = [k for k, _ in params]
    assert ("match[]", "m") in params and "timeout" in keys and "limit" not in keys  # 2.42: no limit param
    start = float(dict(params)["start"])
    end = float(dict(params)["end"])
    assert end - start == pytest.approx(6 * 3600)
    assert "clamped" in headers["X-Promguard"]
    assert run.count("series", "ok") == 1


async def test_result_limit_truncates_with_warning():
    async with FakeProm(n_series=50) as up:
        run = Running(up.url, max_series=10)
        async with run as g:
            status, headers, raw = await get(f"{g.url}/api/v1/series", [("match[]", "m")])
    body = orjson.loads(raw)
    assert status == 200 and len(body["data"]) == 10
    assert body["warnings"] == ["results truncated due to limit"]
    assert run.count("series", "truncated") == 1


async def test_result_limit_reject_mode():
    async with FakeProm(n_series=50) as up:
        async with Running(up.url, max_series=10, on_limit="reject") as g:
            status, _, raw = await get(f"{g.url}/api/v1/label/node/values", [("match[]", "m")])
    assert status == 200  # label endpoints use max_label_results (default 10000)
    async with FakeProm(n_series=50) as up:
        async with Running(up.url, max_label_results=10, on_limit="reject") as g:
            status, _, raw = await get(f"{g.url}/api/v1/label/node/values", [("match[]", "m")])
    assert status == 422 and orjson.loads(raw)["errorType"] == "execution"
    assert up.seen[-1][0] == "GET"  # label values only takes GET upstream


async def test_newer_upstream_gets_limit_parameter():
    async with FakeProm(version="2.53.1") as up:
        async with Running(up.url, max_series=3) as g:
            await get(f"{g.url}/api/v1/series", [("match[]", "m")])
    assert ("limit", "4") in up.seen[-1][2]


async def test_unscoped_refused_without_touching_upstream():
    async with FakeProm() as up:
        run = Running(up.url)
        async with run as g:
            status, _, raw = await get(f"{g.url}/api/v1/series", [("match[]", '{le!=""}')])
    body = orjson.loads(raw)
    assert status == 400 and body["status"] == "error" and body["errorType"] == "bad_data"
    assert up.seen == []
    assert run.count("series", "unscoped") == 1


async def test_deadline_cancels_upstream():
    async with FakeProm(hold=True) as up:  # never answers: only the deadline can end the request
        run = Running(up.url, deadline=0.5)
        async with run as g:
            t0 = time.monotonic()
            status, _, raw = await get(f"{g.url}/api/v1/series", [("match[]", "m")])
            took = time.monotonic() - t0
            await asyncio.wait_for(up.cancelled.wait(), 60)  # upstream handler saw the connection drop
    body = orjson.loads(raw)
    assert status == 503 and body["errorType"] == "timeout"
    assert "within 0.5s" in body["error"]
    assert took >= 0.45  # it waited for its deadline (a slower machine only adds to this)
    assert run.count("series", "deadline") == 1


async def test_client_going_away_cancels_upstream():
    async with FakeProm(hold=True) as up:
        run = Running(up.url, deadline=600)  # the deadline cannot be what ends it
        async with run as g:
            async with aiohttp.ClientSession() as s:
                req = asyncio.create_task(s.get(f"{g.url}/api/v1/labels", params=[("match[]", "m")]))
                await asyncio.wait_for(up.started.wait(), 60)  # the request reached the upstream
                req.cancel()  # the client goes away
                await asyncio.gather(req, return_exceptions=True)
            await asyncio.wait_for(up.cancelled.wait(), 60)
            for _ in range(1200):
                if run.count("labels", "client_gone") == 1:
                    break
                await asyncio.sleep(0.05)
            assert run.count("labels", "client_gone") == 1
            assert g.metrics.inflight._value.get() == 0


async def test_concurrency_cap():
    async with FakeProm(hold=True) as up:
        run = Running(up.url, max_concurrent=1, deadline=600)
        async with run as g:
            first = asyncio.create_task(get(f"{g.url}/api/v1/series", [("match[]", "m")]))
            await asyncio.wait_for(up.started.wait(), 60)  # the first is held upstream
            status, _, raw = await get(f"{g.url}/api/v1/series", [("match[]", "m")])
            assert status == 503 and orjson.loads(raw)["errorType"] == "unavailable"
            assert run.count("series", "busy") == 1
            up.release.set()
            s1, _, _ = await first
            assert s1 == 200


async def test_upstream_error_is_passed_on():
    async with FakeProm() as up:
        async with Running(up.url) as g:
            status, _, raw = await get(f"{g.url}/api/v1/series", [("match[]", "broken")])
    assert status == 400 and orjson.loads(raw)["error"] == "upstream says no"


async def test_upstream_down():
    async with FakeProm() as up:
        url = up.url
    async with Running(url, upstream_limit="never") as g:
        status, _, raw = await get(f"{g.url}/api/v1/series", [("match[]", "m")])
        assert status == 502 and orjson.loads(raw)["status"] == "error"
        status, _, raw = await get(f"{g.url}/api/v1/query", {"query": "up"})
        assert status == 502


async def test_passthrough_is_untouched_and_keeps_encoding():
    async with FakeProm() as up:
        run = Running(up.url)
        async with run as g:
            async with aiohttp.ClientSession(auto_decompress=False) as s:
                async with s.get(f"{g.url}/api/v1/query", params={"query": 'sum(rate(x{a="b"}[5m]))'},
                                 headers={"Accept-Encoding": "gzip"}) as r:
                    raw = await r.read()
                    assert r.headers["Content-Encoding"] == "gzip"
                    assert r.headers["X-Upstream"] == "yes"
                async with s.post(f"{g.url}/api/v1/write", data=b"\x00\x01snappy-bytes") as r:
                    assert r.status == 201 and await r.read() == b"\x00\x01snappy-bytes"
            assert orjson.loads(gzip.decompress(raw))["q"] == 'sum(rate(x{a="b"}[5m]))'
            status, _, metrics = await get(f"{g.url}/-/promguard/metrics")
    assert status == 200
    assert b'fleetkeeper_promguard_passthrough_requests_total{code_class="2xx"} 2.0' in metrics


def test_settings_errors_are_collected():
    with pytest.raises(ConfigError) as e:
        load_settings("flags", upstream="localhost:9090", deadline=-1, listen_port=70000, on_limit="drop")
    paths = {p for p, _, _ in e.value.problems}
    assert {"upstream", "deadline", "listen_port", "on_limit"} <= paths
    ok = load_settings("flags", upstream="http://prom:9090/", deadline=3)
    assert ok.upstream == "http://prom:9090" and ok.policy.deadline == 3
