"""``make demo``, relay part: agents follow their node through the relay (one
API-server watch for all of them), then a burst of new nodes gets its join
work at a paced rate."""

from __future__ import annotations

import asyncio
import time

from fleetkeeper.core import errors
from fleetkeeper.core.kube import NAMESPACES, NODES, PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.outcome import Outcome
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.relay.client import RelayClient
from fleetkeeper.relay.controller import add_pacer, add_relay
from fleetkeeper.relay.settings import PacerSettings, RelaySettings

NS = "fleetkeeper-relay-demo"
JOIN_PREFIX = "relay-demo-join"


async def _until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


def _node(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                                  "fleetkeeper.io/relay-demo": "true"},
                         "annotations": {"kwok.x-k8s.io/node": "fake"}},
            "status": {"capacity": {"cpu": "96", "memory": "384Gi", "pods": "110"},
                       "allocatable": {"cpu": "94", "memory": "370Gi", "pods": "110"}}}


async def demo(ctx) -> Outcome:
    kube = ctx.kube
    outcome = Outcome()
    try:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    except errors.Conflict:
        pass
    settings = RuntimeSettings(namespace=NS, server={"port": 0}, leader_election={"enabled": False})
    mgr = Manager(kube, settings, registry=None)
    relay = add_relay(mgr, RelaySettings(port=0, bookmark_interval=5))
    pacer = add_pacer(mgr, PacerSettings(enabled=True, rate=10, burst=5, workers=4,
                                         node_selector="fleetkeeper.io/relay-demo=true", labels={"fleetkeeper.io/joined": "true"},
                                         bootstrap_pod={"namespace": NS, "annotations":
                                                        {"fleetkeeper.io/sim-result": "succeed"}}))
    task = asyncio.create_task(mgr.run())
    agents: list[asyncio.Task] = []
    clients: list[RelayClient] = []
    created_nodes: list[str] = []
    try:
        # the first sync lists every node and pod: its time grows with the fleet (60 s + 30 s per 1,500 nodes)
        limit = 60 + ctx.nodes / 50
        if not outcome.expect(await _until(lambda: relay.synced() and relay.server.port != 0, limit),
                              "the relay syncs"):
            ctx.report(f"relay did not sync within {limit:.0f} s")
            return outcome
        url = f"http://127.0.0.1:{relay.server.port}"
        nodes = [n["metadata"]["name"] for n in (await kube.list(NODES, label_selector="type=kwok"))[0]][:20]
        seen: dict[str, set[str]] = {n: set() for n in nodes}

        async def follow(client: RelayClient, node: str) -> None:
            async for st in client.sync():
                seen[node] = {k for k in st.pods if k.startswith(NS + "/")}

        for n in nodes:
            c = RelayClient(url, n)
            clients.append(c)
            agents.append(asyncio.create_task(follow(c, n)))
        outcome.expect(await _until(lambda: relay.hub.subscribers == len(nodes), 30),
                       f"all {len(nodes)} agents subscribed", f"{relay.hub.subscribers}")
        ctx.report(f"relay up: {relay.upstream_watches} API-server watches (nodes, pods, team ConfigMap) "
                   f"serving {relay.hub.subscribers} agents")
        target = nodes[0]
        t0 = time.monotonic()
        await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "relay-demo-pod"},
                                 "spec": {"nodeName": target, "tolerations": [{"operator": "Exists"}],
                                          "containers": [{"name": "c", "image": "busybox"}]}}, NS)
        ok = await _until(lambda: f"{NS}/relay-demo-pod" in seen[target], 20)
        others = sum(1 for n in nodes[1:] if seen[n])
        outcome.expect(ok, "the pod's own agent sees it")
        outcome.expect(others == 0, "no other agent receives it", f"{others} foreign pods")
        ctx.report(f"pod on {target}: its agent saw it after {time.monotonic() - t0:.2f}s" if ok else
                   f"pod on {target}: its agent did NOT see it within 20 s")
        ctx.report(f"agents of the other {len(nodes) - 1} nodes received {others} foreign pods; "
                   f"events fanned out: {relay.hub.stats.fanned_out}")

        # a burst of 30 nodes joining at once; their join work is paced at 10 nodes/s
        created_nodes = [f"{JOIN_PREFIX}-{i:03d}" for i in range(30)]
        t0 = time.monotonic()
        await asyncio.gather(*(kube.create(NODES, _node(n)) for n in created_nodes), return_exceptions=True)
        done = await _until(lambda: all(n in pacer.done for n in created_nodes), 45)
        spread = time.monotonic() - t0
        outcome.expect(done, "every joining node's join work done")
        waits = sorted(pacer.done.get(n, 0.0) for n in created_nodes)
        ctx.report(f"30 nodes joined at once; join work (label + bootstrap pod) paced at 10 nodes/s: "
                   f"{'all done' if done else 'NOT all done'} in {spread:.1f}s "
                   f"(first {waits[0]:.1f}s, last {waits[-1]:.1f}s after joining)")
    finally:
        for t in agents:
            t.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
        for c in clients:
            await c.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for n in created_nodes:
            try:
                await kube.delete(NODES, n)
            except errors.NotFound:
                pass
        try:
            await kube.delete(NAMESPACES, NS)
        except errors.NotFound:
            pass
    return outcome
