"""The relay behind on its work, against the real local control plane: agents are
refused with 503 and Retry-After (before the relay does any work for them),
wait, and then get a view that holds what changed in the API server meanwhile;
the relay keeps its one watch per resource throughout."""

from __future__ import annotations

import asyncio

import aiohttp

from fleetkeeper.core.kube import PODS
from fleetkeeper.relay.admission import BackoffPolicy
from fleetkeeper.relay.client import RelayClient
from fleetkeeper.relay.controller import RelayHandle

from test_relay_e2e import NODE, pod, relay, until  # same directory (rootdir-relative import)


class SetLag:
    """The relay's event-loop lag, set by the test: 'behind' on demand, on any machine."""

    def __init__(self, lag: float):
        self.lag = lag

    def now(self) -> float:
        return self.lag

    def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def refused(handle: RelayHandle) -> float:
    return handle.metrics.registry.get_sample_value("fleetkeeper_relay_refused_total", {"reason": "lag"}) or 0


async def test_agent_is_refused_with_retry_after_while_the_relay_is_behind_then_recovers(kube, namespace):
    lag = SetLag(25.0)
    async with relay(kube, namespace, lag=lag, max_lag=1.0) as (handle, url):
        async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/nodes/{NODE}/view") as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "50"
            body = await r.json()
        assert body["details"]["retryAfterSeconds"] == 50 and "25.0s behind" in body["message"]

        # the agent's wait is capped in this test (the relay asked for 50 s; the schedule is unit-tested)
        client = RelayClient(url, NODE, backoff=BackoffPolicy(max_retry_after=0.1))
        states: list = []

        async def follow():
            async for st in client.sync():
                states.append(dict(st.pods))

        task = asyncio.create_task(follow())
        try:
            await until(lambda: client.busy >= 3, what="the agent refused three times")
            assert states == [] and handle.hub.subscribers == 0  # no view, no watch: nothing done for it
            assert refused(handle) >= 4
            # the cluster changes while the relay is behind
            await kube.create(PODS, pod("while-behind", NODE), namespace)
            key = f"{namespace}/while-behind"
            await until(lambda: key in {f"{p['namespace']}/{p['name']}" for p in handle.hub.pod_docs(NODE)},
                        what="the relay's cache has the pod")
            assert states == []
            lag.lag = 0.0  # caught up
            await until(lambda: states and key in states[-1], timeout=30, what="the agent's view after recovery")
            await until(lambda: handle.hub.subscriber_count(NODE) == 1, what="the agent watching again")
            # and it follows changes from there, over its watch
            await kube.create(PODS, pod("after", NODE), namespace)
            await until(lambda: f"{namespace}/after" in states[-1], timeout=30, what="a later pod over the watch")
            assert client.retries == client.busy  # every retry was a 503 answer: none timed out
            assert handle.upstream_watches == 3
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
