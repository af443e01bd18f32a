"""The HTTP API and RelayClient, in-process (hub fed by hand, real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.relay.admission import BackoffPolicy
from fleetkeeper.relay.auth import Identity
from fleetkeeper.relay.client import RelayBusy, RelayClient, RelayGone
from fleetkeeper.relay.hub import Hub
from fleetkeeper.relay.metrics import RelayMetrics
from fleetkeeper.relay.server import RelayServer
from fleetkeeper.relay.settings import RelaySettings
from fleetkeeper.relay.views import AgentProjector

from test_relay_hub import raw_node, raw_pod  # same directory (rootdir-relative import)

PROJ = AgentProjector(("fleetkeeper.io/",))


@contextlib.asynccontextmanager
async def serving(hub: Hub, ready=lambda: True, authenticator=None, lag=None, **kw):
    reg = CollectorRegistry()
    metrics = RelayMetrics(reg)
    metrics.attach_hub(hub, lambda: 3)
    srv = RelayServer(hub, RelaySettings(port=0, **kw), metrics, ready=ready, authenticator=authenticator,
                      lag=lag)
    await srv.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.port}", reg
    finally:
        await srv.stop()


async def wait_for(pred, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_snapshots_and_pods_shape():
    hub = Hub()
    hub.on_node("ADDED", "node-a", None, PROJ.node(raw_node("node-a")))
    p = PROJ.pod(raw_pod("p1", "node-a", labels={"fleetkeeper.io/team": "a"}))
    hub.on_pod("ADDED", p.key, None, p)
    async with serving(hub) as (_, url, reg), RelayClient(url, "node-a") as c:
        doc = await c.pods()
        assert doc["items"] == [{"namespace": "ns", "name": "p1", "uid": "uid-p1", "ip": "10.0.0.1",
                                 "phase": "Running", "labels": {"fleetkeeper.io/team": "a"}, "annotations": {}}]
        assert doc["resourceVersion"] == hub.rv()
        assert (await c.node_object())["name"] == "node-a"
        with pytest.raises(errors.NotFound):
            await RelayClient(url, "node-zz", session=c._s()).node_object()
        with pytest.raises(errors.NotFound):
            await c.teams()
        assert reg.get_sample_value("fleetkeeper_relay_requests_total", {"endpoint": "pods", "code": "200"}) == 1
        assert reg.get_sample_value("fleetkeeper_relay_bytes_sent_total", {"endpoint": "pods"}) > 50


async def test_not_ready_answers_503():
    async with serving(Hub(), ready=lambda: False) as (_, url, _reg):
        async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/nodes/x/pods") as r:
            assert r.status == 503
        async with aiohttp.ClientSession() as s, s.get(f"{url}/readyz") as r:
            assert r.status == 503


async def test_sync_follows_changes_and_relists_after_gone():
    hub = Hub()
    # relist_spread small: a restart's relist is spread over it (tested in test_relay_admission)
    async with serving(hub, bookmark_interval=0.2) as (srv, url, reg), \
            RelayClient(url, "node-a", backoff=BackoffPolicy(relist_spread=0.2)) as c:
        states = []

        async def follow():
            async for st in c.sync():
                states.append((st.relists, sorted(st.pods)))

        task = asyncio.create_task(follow())
        try:
            await wait_for(lambda: states and hub.subscriber_count("node-a") == 1)
            p = PROJ.pod(raw_pod("p1", "node-a"))
            hub.on_pod("ADDED", p.key, None, p)
            q = PROJ.pod(raw_pod("q1", "node-b"))
            hub.on_pod("ADDED", q.key, None, q)
            await wait_for(lambda: states[-1] == (1, ["ns/p1"]))
            # a bookmark arrives while idle and moves the client's resourceVersion
            await wait_for(lambda: (reg.get_sample_value("fleetkeeper_relay_bytes_sent_total",
                                                         {"endpoint": "watch"}) or 0) > 150)
            # a "restart": the hub gets a new epoch; the client's watch is cut and its rv is foreign
            hub.epoch = "restarted"
            await srv.stop()
            srv.reset()
            srv.settings = srv.settings.model_copy(update={"port": srv.port})
            await srv.start()
            hub.on_pod("DELETED", p.key, p, None)
            await wait_for(lambda: states[-1] == (2, []), timeout=10)
            assert not any("ns/q1" in pods for _, pods in states)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_watch_resume_and_poll_mode():
    hub = Hub()
    async with serving(hub) as (_, url, _reg), RelayClient(url, "node-a") as c:
        rv = hub.rv()
        p = PROJ.pod(raw_pod("p1", "node-a"))
        hub.on_pod("ADDED", p.key, None, p)
        async with c._s().get(f"{url}/v1/nodes/node-a/watch", params={"resourceVersion": rv, "mode": "poll",
                                                                       "timeoutSeconds": "2"}) as r:
            doc = await r.json()
        assert [(e["type"], e["object"]["name"]) for e in doc["events"]] == [("ADDED", "p1")]
        with pytest.raises(RelayGone):
            async for _ in c.watch("someone-else-1", timeout_seconds=1):
                pass
        evs = []
        async for ev in c.watch(rv, timeout_seconds=1):
            evs.append(ev)
        assert [e["type"] for e in evs] == ["ADDED"]


async def test_slow_watcher_gets_410_in_stream():
    hub = Hub(buffer=2)
    async with serving(hub) as (_, url, reg), RelayClient(url, "node-a") as c:
        rv = hub.rv()
        gen = c.watch(rv, timeout_seconds=5)
        first = asyncio.ensure_future(gen.__anext__())
        await wait_for(lambda: hub.subscriber_count("node-a") == 1)
        for i in range(10):  # synchronously: the writer cannot drain in between
            p = PROJ.pod(raw_pod(f"p{i}", "node-a"))
            hub.on_pod("ADDED", p.key, None, p)
        with pytest.raises(RelayGone):
            await first
        await gen.aclose()
        assert hub.stats.dropped == 1 and hub.subscribers == 0


# --- overload: 503 with Retry-After, dropped requests of clients that left ----------------------------------
class FixedLag:
    """The relay's event-loop lag, set by the test (the real one is measured: see LoopLag)."""

    def __init__(self, lag: float):
        self.lag = lag

    def now(self) -> float:
        return self.lag

    def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def requests(reg, endpoint: str, code: str) -> float:
    return reg.get_sample_value("fleetkeeper_relay_requests_total", {"endpoint": endpoint, "code": code}) or 0


async def test_behind_relay_refuses_with_503_and_retry_after_before_any_work():
    hub = Hub()
    hub.on_node("ADDED", "node-a", None, PROJ.node(raw_node("node-a")))
    lag = FixedLag(4.2)
    async with serving(hub, lag=lag, max_lag=1.0) as (srv, url, reg), RelayClient(url, "node-a") as c:
        async with c._s().get(f"{url}/v1/nodes/node-a/view") as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "9"  # twice the lag, rounded up
            doc = await r.json()
        assert doc["reason"] == "ServiceUnavailable" and doc["details"] == {"retryAfterSeconds": 9}
        assert "4.2s behind" in doc["message"]
        with pytest.raises(RelayBusy) as info:  # the client reads Retry-After
            await c.view()
        assert info.value.delay == 9
        with pytest.raises(RelayBusy):  # a watch is refused the same way, before it subscribes
            async for _ in c.watch(hub.rv(), timeout_seconds=1):
                pass
        assert hub.subscribers == 0
        assert requests(reg, "view", "503") == 2 and requests(reg, "view", "200") == 0
        assert requests(reg, "watch", "503") == 1
        assert reg.get_sample_value("fleetkeeper_relay_refused_total", {"reason": "lag"}) == 3
        assert reg.get_sample_value("fleetkeeper_relay_loop_lag_seconds") == 4.2
        lag.lag = 0.0  # caught up: served again
        assert (await c.view()).node["name"] == "node-a"


async def test_agent_waits_out_503_then_gets_its_view():
    hub = Hub()
    hub.on_node("ADDED", "node-a", None, PROJ.node(raw_node("node-a")))
    # the client's wait is capped (max_retry_after) so the test does not sleep Retry-After's seconds
    policy = BackoffPolicy(max_retry_after=0.05)
    lag = FixedLag(30.0)
    async with serving(hub, lag=lag) as (srv, url, reg), RelayClient(url, "node-a", backoff=policy) as c:
        states = []

        async def follow():
            async for st in c.sync():
                states.append(st.node)

        task = asyncio.create_task(follow())
        try:
            await wait_for(lambda: c.busy >= 3)
            assert states == []  # refused, not served
            lag.lag = 0.0
            await wait_for(lambda: states and hub.subscriber_count("node-a") == 1)
            assert states[0]["name"] == "node-a"
            assert c.retries == c.busy  # every retry was a 503, none a timeout or a new failure
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class GatedAuth:
    """Authenticates every token as node-a's kubelet once the gate opens (a TokenReview that takes its time)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0

    async def authenticate(self, token: str) -> Identity:
        self.waiting += 1
        await self.gate.wait()
        return Identity("system:node:node-a")


async def test_inflight_bound_refuses_the_request_over_it():
    hub = Hub()
    auth = GatedAuth()
    async with serving(hub, auth="tokenreview", authenticator=auth, max_inflight=2) as (srv, url, reg), \
            aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as s:
        held = [asyncio.create_task(s.get(f"{url}/v1/nodes/node-a/pods")) for _ in range(2)]
        await wait_for(lambda: auth.waiting == 2)
        assert srv.inflight == 2
        async with s.get(f"{url}/v1/nodes/node-a/pods", timeout=aiohttp.ClientTimeout(total=30)) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert reg.get_sample_value("fleetkeeper_relay_refused_total", {"reason": "inflight"}) == 1
        assert reg.get_sample_value("fleetkeeper_relay_inflight_requests") == 2
        auth.gate.set()
        for t in held:
            r = await t
            assert r.status == 200
            r.release()
        assert srv.inflight == 0  # every place given back
        async with s.get(f"{url}/v1/nodes/node-a/pods") as r:
            assert r.status == 200


async def test_request_of_a_client_that_left_is_dropped_unanswered():
    hub = Hub()
    hub.on_node("ADDED", "node-a", None, PROJ.node(raw_node("node-a")))
    async with serving(hub) as (srv, url, reg):
        # sent and closed before the relay's loop runs again: the client gave up while the request queued
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"GET /v1/nodes/node-a/view HTTP/1.1\r\nHost: relay\r\n\r\n")
        sock.close()
        await wait_for(lambda: requests(reg, "view", "499") == 1)
        assert requests(reg, "view", "200") == 0
        assert srv.inflight == 0
        async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/nodes/node-a/view") as r:
            assert r.status == 200  # a client that waits is served


async def test_a_request_that_timed_out_makes_the_next_one_wait_longer():
    held = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)  # accepts, never answers
    port = silent.sockets[0].getsockname()[1]
    try:
        async with RelayClient(f"http://127.0.0.1:{port}", "node-a", request_timeout=0.1) as c:
            for expect in (0.2, 0.4, 0.8):
                with pytest.raises(errors.ApiUnreachable, match="no answer in time"):
                    await c.view()
                assert c._timeout() == pytest.approx(expect)
    finally:
        for w in held:
            w.close()
        silent.close()
        await silent.wait_closed()
