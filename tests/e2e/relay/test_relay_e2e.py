"""The relay against the real local control plane: an agent sees its node's
pods come and go (and nothing of other nodes), resumes across a relay
restart, the API server holds one pod watch however many agents subscribe,
and TokenReview authentication admits only the node's own agent."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import aiohttp
import pytest

from fleetkeeper.core import errors
from fleetkeeper.core.kube import CONFIGMAPS, PODS, SERVICEACCOUNTS, Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.relay.client import RelayClient
from fleetkeeper.relay.controller import RelayHandle, add_relay
from fleetkeeper.relay.settings import RelaySettings

NODE = "node-gpu-00001"
OTHER = "node-gpu-00002"


async def until(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.asynccontextmanager
async def relay(kube: Kube, namespace: str, lag=None, **kw):
    """A relay on the manager, synced; ``lag``: its event-loop lag meter, replaced before it serves."""
    settings = RuntimeSettings(namespace=namespace, server={"port": 0}, leader_election={"enabled": False})
    mgr = Manager(kube, settings)
    handle: RelayHandle = add_relay(mgr, RelaySettings(**{"port": 0, "bookmark_interval": 1.0, **kw}))
    if lag is not None:
        handle.server.lag = lag
    task = asyncio.create_task(mgr.run())
    try:
        await until(lambda: handle.synced() and handle.server.port != 0 or task.done(), what="relay synced")
        assert not task.done(), task.exception()
        yield handle, f"http://127.0.0.1:{handle.server.port}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def pod(name: str, node: str, sa: str | None = None) -> dict:
    spec: dict = {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}],
                  "tolerations": [{"operator": "Exists"}]}
    if sa:
        spec["serviceAccountName"] = sa
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"fleetkeeper.io/team": "a"}},
            "spec": spec}


async def pod_watches(kube: Kube) -> int:
    """WATCH requests on pods open on the API server now (its own /metrics)."""
    resp = await kube._send(__import__("fleetkeeper.core.kube", fromlist=["Request"]).Request(
        "get", "GET", "/metrics", resource="metrics"))
    text = (await resp.read()).decode()
    resp.release()
    total = 0
    for line in text.splitlines():
        if line.startswith("apiserver_longrunning_requests{") and 'resource="pods"' in line \
                and 'verb="WATCH"' in line and 'subresource=""' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def follow(client: RelayClient, states: list):
    async for st in client.sync():
        states.append((st.relists, dict(st.pods), st.teams))


async def test_agent_sees_only_its_node_and_resumes_after_restart(kube, namespace):
    async with relay(kube, namespace) as (handle, url):
        port = handle.server.port
        client = RelayClient(url, NODE)
        states: list = []
        task = asyncio.create_task(follow(client, states))
        try:
            await until(lambda: states, what="first view")
            await kube.create(PODS, pod("mine", NODE), namespace)
            await kube.create(PODS, pod("theirs", OTHER), namespace)
            key = f"{namespace}/mine"
            t0 = time.monotonic()
            await until(lambda: key in states[-1][1] and states[-1][1][key]["ip"], timeout=20,
                        what="pod added (with its IP) at the agent")
            added_s = time.monotonic() - t0
            assert states[-1][1][key]["labels"]["fleetkeeper.io/team"] == "a"
            await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": "fleetkeeper-teams"},
                                           "data": {"teams.yaml": "team-a: {}"}}, namespace)
            await until(lambda: states[-1][2] is not None, what="team config at the agent")
            await kube.delete(PODS, "mine", namespace, grace_period=0)
            await until(lambda: key not in states[-1][1], timeout=20, what="pod removed at the agent")
            assert not any(f"{namespace}/theirs" in pods for _, pods, _ in states)
            # the /pods endpoint other agents (network accounting) read
            async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/nodes/{OTHER}/pods") as r:
                doc = await r.json()
            assert [p["name"] for p in doc["items"] if p["namespace"] == namespace] == ["theirs"]
            print(f"pod visible at the agent {added_s:.2f}s after create")
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
            raise
        relists_before = states[-1][0]
    # the relay is down: a pod created now must reach the agent after the restart
    await kube.create(PODS, pod("while-down", NODE), namespace)
    try:
        async with relay(kube, namespace, port=port):
            await until(lambda: states[-1][0] > relists_before and f"{namespace}/while-down" in states[-1][1],
                        timeout=40, what="agent relisted from the restarted relay")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_one_upstream_pod_watch_for_many_agents(kube, namespace):
    before = await pod_watches(kube)
    async with relay(kube, namespace) as (handle, url):
        deadline = time.monotonic() + 30
        while (with_relay := await pod_watches(kube)) < before + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the relay's watch request is registered a moment after it is sent
        clients = [RelayClient(url, f"node-gpu-{i % 21:05d}") for i in range(120)]
        streams = [asyncio.create_task(follow(c, [])) for c in clients]
        try:
            await until(lambda: handle.hub.subscribers == len(clients), what="120 agents subscribed")
            with_agents = await pod_watches(kube)
            await kube.create(PODS, pod("fan", NODE), namespace)
            await until(lambda: handle.hub.stats.fanned_out >= 120 // 21, what="fan-out")
        finally:
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            for c in clients:
                await c.close()
    assert with_relay - before == 1, (before, with_relay)
    assert with_agents == with_relay, f"agents added API-server watches: {with_relay} -> {with_agents}"
    assert handle.upstream_watches == 3


async def test_tokenreview_admits_only_the_nodes_agent(kube, namespace, cluster):
    sa = "node-agent"
    await kube.create(SERVICEACCOUNTS, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}},
                      namespace)
    agent = await kube.create(PODS, pod("agent-0", NODE, sa=sa), namespace)
    tr = await kube.create(SERVICEACCOUNTS, {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 600, "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "agent-0",
                                                               "uid": agent["metadata"]["uid"]}}},
        namespace, subresource="token", name=sa)
    token = tr["status"]["token"]
    alice = re.search(r"token: (\S+)", cluster.user_kubeconfig("alice").read_text()).group(1)
    async with relay(kube, namespace, auth="tokenreview", agent_service_accounts=[f"{namespace}:{sa}"]) as (h, url):
        async def status(node: str, tok: str | None) -> int:
            try:
                async with RelayClient(url, node, token=tok) as rc:
                    await rc.pods()
                return 200
            except errors.ApiError as exc:
                return exc.status

        c = RelayClient(url, NODE, token=token)
        try:
            doc = await c.pods()
            assert "agent-0" in [p["name"] for p in doc["items"]]
        finally:
            await c.close()
        assert await status(OTHER, token) == 403
        assert await status(NODE, None) == 401
        assert await status(NODE, "not-a-token") == 401
        assert await status(NODE, alice) == 403
        reviews = h.metrics.token_reviews._value.get()
        assert reviews >= 3  # the same token twice is answered from the cache
        c2 = RelayClient(url, NODE, token=token)
        try:
            await c2.pods()
        finally:
            await c2.close()
        assert h.metrics.token_reviews._value.get() == reviews
