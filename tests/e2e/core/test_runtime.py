"""The controller runtime against the real API server: informers across an
API-server restart, 410 Gone and relist, leader election hand-over."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import CONFIGMAPS, LEASES
from fleetkeeper.core.leader import LeaderElector
from fleetkeeper.core.metrics import RuntimeMetrics
from prometheus_client import CollectorRegistry


def cm(name: str, value: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": value}}


async def until(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def restart_apiserver(cluster, sig=signal.SIGKILL) -> None:
    cluster.stop_component("kube-apiserver", sig=sig)
    cluster.start_component("kube-apiserver")


def project(obj: dict) -> str | None:
    return (obj.get("data") or {}).get("v")


async def test_informer_sees_every_change_once_across_apiserver_restart(cluster, kube, namespace):
    events: list[tuple[str, str, str | None]] = []
    inf = Informer(kube, CONFIGMAPS, project, namespace=namespace, metrics=RuntimeMetrics(CollectorRegistry()))
    inf.add_handler(lambda typ, key, old, new: events.append((typ, key.split("/")[1], new))
                    if key.split("/")[1].startswith("c") else None)
    task = asyncio.create_task(inf.run())
    try:
        await inf.wait_synced(30)
        expected = []
        for i in range(5):
            await kube.create(CONFIGMAPS, cm(f"c{i}", "0"), namespace)
            expected.append(("ADDED", f"c{i}", "0"))
        await kube.patch(CONFIGMAPS, "c0", {"data": {"v": "1"}}, namespace)
        expected.append(("MODIFIED", "c0", "1"))
        await until(lambda: len(events) >= len(expected), what="events before restart")

        await asyncio.to_thread(restart_apiserver, cluster)
        # changes made right after the restart, while the informer reconnects
        for i in range(5, 8):
            await kube.create(CONFIGMAPS, cm(f"c{i}", "0"), namespace)
            expected.append(("ADDED", f"c{i}", "0"))
        await kube.patch(CONFIGMAPS, "c1", {"data": {"v": "2"}}, namespace)
        expected.append(("MODIFIED", "c1", "2"))
        await kube.delete(CONFIGMAPS, "c2", namespace)
        expected.append(("DELETED", "c2", None))
        await until(lambda: len(events) >= len(expected), timeout=60, what="events after restart")
        await asyncio.sleep(1.0)  # any duplicate would arrive now
        assert events == expected  # every change, exactly once, in order
        # resumed from its resourceVersion: no relist storm. The restarted API server's watch cache can start
        # past the informer's resourceVersion (changes made while it came back): one 410 and one relist then
        assert inf.relists <= 2
        assert inf.watch_starts >= 2
        assert sorted(k for k in inf.keys() if "/c" in k) == sorted(f"{namespace}/c{i}" for i in range(8) if i != 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def etcd_compact(cluster) -> int:
    base = f"http://127.0.0.1:{cluster.state.ports.etcd}"
    req = urllib.request.Request(f"{base}/v3/kv/range", data=json.dumps({"key": "AA=="}).encode(), method="POST")
    rev = int(json.load(urllib.request.urlopen(req, timeout=10))["header"]["revision"])
    req = urllib.request.Request(f"{base}/v3/kv/compaction", data=json.dumps({"revision": rev, "physical": True}).encode(),
                                 method="POST")
    urllib.request.urlopen(req, timeout=30).read()
    return rev


async def test_gone_leads_to_relist_and_convergence(cluster, kube, namespace):
    seen: list[tuple[str, str]] = []
    inf = Informer(kube, CONFIGMAPS, project, namespace=namespace)
    inf.add_handler(lambda typ, key, old, new: seen.append((typ, key.split("/")[1]))
                    if key.split("/")[1].startswith("g") else None)
    for i in range(3):
        await kube.create(CONFIGMAPS, cm(f"g{i}", "0"), namespace)
    task = asyncio.create_task(inf.run())
    await inf.wait_synced(30)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stale_rv = inf.resource_version
    seen.clear()
    # while the informer is away: changes, then history is compacted and the
    # API server's watch cache is gone, so its resourceVersion is too old
    await kube.delete(CONFIGMAPS, "g0", namespace)
    await kube.patch(CONFIGMAPS, "g1", {"data": {"v": "9"}}, namespace)
    await kube.create(CONFIGMAPS, cm("g3", "0"), namespace)
    for i in range(30):  # move etcd's revision well past the stale one
        await kube.patch(CONFIGMAPS, "g2", {"data": {"v": str(i)}}, namespace)
    await asyncio.to_thread(etcd_compact, cluster)
    await asyncio.to_thread(restart_apiserver, cluster, signal.SIGTERM)
    assert inf.resource_version == stale_rv
    task = asyncio.create_task(inf.run())
    try:
        await until(lambda: inf.relists >= 2, timeout=60, what="relist after 410 Gone")
        await until(lambda: inf.get(f"{namespace}/g1") == "9" and inf.get(f"{namespace}/g2") == "29"
                    and inf.get(f"{namespace}/g3") == "0" and inf.get(f"{namespace}/g0") is None,
                    timeout=30, what="convergence")
        assert ("DELETED", "g0") in seen and ("ADDED", "g3") in seen
        assert seen.count(("MODIFIED", "g1")) == 1
        # later changes still arrive through the new watch
        await kube.patch(CONFIGMAPS, "g3", {"data": {"v": "after"}}, namespace)
        await until(lambda: inf.get(f"{namespace}/g3") == "after", what="watch after relist")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_leader_election_hands_over_when_leader_dies(kube, namespace):
    a = LeaderElector(kube, "test-lease", namespace, "a", lease_duration=2, renew_period=0.3)
    b = LeaderElector(kube, "test-lease", namespace, "b", lease_duration=2, renew_period=0.3)
    ta = asyncio.create_task(a.run())
    await asyncio.wait_for(a.is_leader.wait(), 10)
    tb = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(2.5)  # longer than the lease: a renews, so b must not win
        assert a.is_leader.is_set() and not b.is_leader.is_set()
        ta.cancel()  # the leader dies without releasing the lease
        await asyncio.gather(ta, return_exceptions=True)
        await asyncio.wait_for(b.is_leader.wait(), 60)  # after the 2 s lease runs out; how soon is bench's business
        lease = await kube.get(LEASES, "test-lease", namespace)
        assert lease["spec"]["holderIdentity"] == "b"
        assert lease["spec"]["leaseTransitions"] == 1
    finally:
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)


async def test_events_about_nodes_and_pods_are_recorded(kube, namespace):
    from fleetkeeper.core.events import EventRecorder, ObjectRef, node_ref
    from fleetkeeper.core.kube import EVENTS

    rec = EventRecorder(kube, "test", namespace="fleetkeeper-system")
    await rec.emit(node_ref("node-gpu-00000"), "TestReason", f"about a node {namespace}")
    await rec.emit(node_ref("node-gpu-00000"), "TestReason", f"about a node {namespace}")  # aggregated
    await rec.emit(ObjectRef("Pod", "p", namespace), "TestReason", "about a pod")
    assert await rec.flush(60)
    node_events, _ = await kube.list(EVENTS, "default", field_selector="reason=TestReason")
    mine = [e for e in node_events if e.get("note") == f"about a node {namespace}"]
    assert len(mine) == 1 and mine[0]["regarding"]["kind"] == "Node"
    assert mine[0]["series"]["count"] == 2
    pod_events, _ = await kube.list(EVENTS, namespace)
    assert [e["note"] for e in pod_events] == ["about a pod"]
    # a repeat after the first was written continues it as a series
    await rec.emit(node_ref("node-gpu-00000"), "TestReason", f"about a node {namespace}")
    assert await rec.flush(60)
    node_events, _ = await kube.list(EVENTS, "default", field_selector="reason=TestReason")
    mine = [e for e in node_events if e.get("note") == f"about a node {namespace}"]
    assert len(mine) == 1 and mine[0]["series"]["count"] == 3


async def test_a_burst_of_events_is_written_off_the_caller_path_counted_never_silently_dropped(kube, namespace):
    """600 occurrences on 200 objects at once, through a recorder allowed 20 writes a second: emit returns
    without a request; every object gets its one Event, repeats as its series count; a sink too small for
    the burst drops what does not fit and counts it in fleetkeeper_events_dropped_total."""
    from prometheus_client import CollectorRegistry

    from fleetkeeper.core.events import EventRecorder, ObjectRef
    from fleetkeeper.core.kube import EVENTS
    from fleetkeeper.core.metrics import RuntimeMetrics

    reg = CollectorRegistry()
    rec = EventRecorder(kube, "burst", metrics=RuntimeMetrics(reg), rate=20.0, burst=20)
    pods = [ObjectRef("Pod", f"p{i:03d}", namespace) for i in range(200)]
    for rep in range(3):
        for p in pods:
            await rec.emit(p, "Burst", f"occurrence of {p.name}")
    assert rec.counts["created"] == 0 and rec.waiting == 200  # nothing written by the callers
    assert rec.counts == {**rec.counts, "queued": 200, "aggregated": 400, "dropped": 0}
    assert await rec.flush(120)
    items, _ = await kube.list(EVENTS, namespace)
    assert sorted(e["regarding"]["name"] for e in items) == [p.name for p in pods]
    assert {e["series"]["count"] for e in items} == {3}
    assert reg.get_sample_value("fleetkeeper_events_total", {"reason": "Burst", "type": "Normal"}) == 600
    assert not reg.get_sample_value("fleetkeeper_events_dropped_total", {"reason": "Burst", "cause": "queue_full"})

    small = EventRecorder(kube, "burst-small", metrics=RuntimeMetrics(CollectorRegistry()), max_pending=5)
    reg2 = small.metrics.registry
    for p in pods[:8]:
        await small.emit(p, "Small", "x")
    assert await small.flush(60)
    assert reg2.get_sample_value("fleetkeeper_events_dropped_total", {"reason": "Small", "cause": "queue_full"}) == 3
    items, _ = await kube.list(EVENTS, namespace, field_selector="reason=Small")
    assert len(items) == 5

async def test_an_event_into_a_namespace_being_deleted_is_counted_not_logged(kube, caplog):
    """The API server refuses new content in a terminating namespace: an expected loss (the object goes
    with it), counted under its own cause and not logged as a failure; another refusal still is."""
    import logging
    import secrets

    from fleetkeeper.core.events import EventRecorder, ObjectRef
    from fleetkeeper.core.kube import NAMESPACES

    ns = f"ending-{secrets.token_hex(3)}"
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    held = cm("held", "0")
    held["metadata"]["finalizers"] = ["fleetkeeper.io/test-hold"]  # keeps the namespace Terminating
    await kube.create(CONFIGMAPS, held, ns)
    reg = CollectorRegistry()
    try:
        await kube.delete(NAMESPACES, ns)
        rec = EventRecorder(kube, "ending", metrics=RuntimeMetrics(reg))
        with caplog.at_level(logging.WARNING, logger="fleetkeeper.events"):
            await rec.emit(ObjectRef("Pod", "p", ns), "GangWaiting", "about a pod of a namespace being deleted")
            await rec.emit(ObjectRef("Pod", "p", f"{ns}-missing"), "Other", "a namespace that does not exist")
            assert await rec.flush(60)
        assert reg.get_sample_value("fleetkeeper_events_dropped_total",
                                    {"reason": "GangWaiting", "cause": "namespace_terminating"}) == 1
        assert reg.get_sample_value("fleetkeeper_events_dropped_total", {"reason": "Other", "cause": "error"}) == 1
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [m for m in warned if "GangWaiting" in m], warned
        assert [m for m in warned if "Other" in m], warned
    finally:
        await kube.patch(CONFIGMAPS, "held", {"metadata": {"finalizers": None}}, ns)


async def test_a_follower_gets_every_change_from_its_leads_one_list_and_watch(kube, namespace):
    """Two projections of one stream: the follower is fed by the lead (one LIST in pages, one watch),
    sees every add, change and delete with its own projection, and both caches hold the same keys
    as an informer that lists everything in one page."""
    for i in range(5):
        await kube.create(CONFIGMAPS, cm(f"f{i}", str(i)), namespace)
    lead = Informer(kube, CONFIGMAPS, project, namespace=namespace, page_size=2)  # three pages
    follower = Informer(kube, CONFIGMAPS, lambda o: ("seen", project(o)), namespace=namespace)
    follower.follow(lead)
    one_page = Informer(kube, CONFIGMAPS, project, namespace=namespace, page_size=500)
    events: list[tuple[str, str, object]] = []
    follower.add_handler(lambda typ, key, old, new: events.append((typ, key.split("/")[1], new)))
    tasks = [asyncio.create_task(i.run()) for i in (lead, follower, one_page)]
    try:
        await lead.wait_synced(30)
        await one_page.wait_synced(30)
        assert follower.synced
        names = {f"{namespace}/f{i}" for i in range(5)}
        assert names <= set(lead.keys()) and set(lead.keys()) == set(follower.keys()) == set(one_page.keys())
        assert all(lead.get(k) == one_page.get(k) for k in one_page.keys())
        assert follower.get(f"{namespace}/f3") == ("seen", "3")
        await kube.patch(CONFIGMAPS, "f1", {"data": {"v": "changed"}}, namespace)
        await kube.delete(CONFIGMAPS, "f2", namespace)
        await until(lambda: ("DELETED", "f2", None) in events, what="the follower seeing the delete")
        assert ("MODIFIED", "f1", ("seen", "changed")) in events
        assert follower.get(f"{namespace}/f2") is None and follower.get(f"{namespace}/f1") == ("seen", "changed")
        assert follower.resource_version == lead.resource_version
        assert (lead.relists, follower.relists) == (1, 1)
        assert lead.watch_starts >= 1 and follower.watch_starts == 0  # the lead's watch feeds both
        assert tasks[1].done()  # the follower's run has nothing to do
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_an_identified_announcement_is_one_event_across_a_restart(kube, namespace):
    """A terminate's announcement that died with its process is made again by the next one: with an ``id`` the
    Event's name derives from the occurrence, so the API server keeps exactly one, written by whichever process
    got there first, and a live process asks the API server only once."""
    from fleetkeeper.core.events import EventRecorder, ObjectRef, event_name
    from fleetkeeper.core.kube import EVENTS

    obj = ObjectRef("Pod", "retiree", namespace, uid="u-1")
    first = EventRecorder(kube, "announce")
    await first.emit(obj, "Retiring", "nccl failed; terminating the machine", type_="Warning", id="retire@100")
    assert await first.flush(30)
    assert first.counts["created"] == 1
    # the restarted process announces the same occurrence again, twice, and a new one
    second = EventRecorder(kube, "announce")
    for _ in range(2):
        await second.emit(obj, "Retiring", "nccl failed; terminating the machine", type_="Warning",
                          id="retire@100")
        assert await second.flush(30)
    assert second.counts["existing"] == 1 and second.counts["known"] == 1 and second.counts["created"] == 0
    await second.emit(obj, "Retiring", "retired again", type_="Warning", id="retire@200")
    assert await second.flush(30)
    items, _ = await kube.list(EVENTS, namespace)
    mine = sorted((e["metadata"]["name"], e["note"]) for e in items if e["regarding"]["name"] == "retiree")
    assert mine == sorted([(event_name(obj, "retire@100"), "nccl failed; terminating the machine"),
                           (event_name(obj, "retire@200"), "retired again")])


async def test_an_announcement_before_an_action_is_written_at_once_and_once(kube, namespace):
    """``announce`` (an eviction's Event, written before the eviction): it is on the API server when the call
    returns, not queued; made again (a retry, a restarted process) it finds the one written; an API server
    that does not answer makes it return False within its timeout, so the caller holds the action back."""
    from fleetkeeper.core.events import EventRecorder, ObjectRef, event_name
    from fleetkeeper.core.kube import EVENTS

    obj = ObjectRef("Pod", "evictee", namespace, uid="u-2")
    first = EventRecorder(kube, "announce-now")
    assert await first.announce(obj, "Evicting", "evicting 1 pod(s)", type_="Warning", id="evict@1:abc")
    assert first.waiting == 0  # nothing left in a sink: it was written by the call itself
    got = await kube.get(EVENTS, event_name(obj, "evict@1:abc"), namespace)
    assert (got["reason"], got["type"], got["note"]) == ("Evicting", "Warning", "evicting 1 pod(s)")
    assert await first.announce(obj, "Evicting", "evicting 1 pod(s)", type_="Warning", id="evict@1:abc")
    assert first.counts["known"] == 1 and first.counts["created"] == 1
    second = EventRecorder(kube, "announce-now")
    assert await second.announce(obj, "Evicting", "evicting 1 pod(s)", type_="Warning", id="evict@1:abc")
    assert second.counts["existing"] == 1 and second.counts["created"] == 0

    class Hung:
        async def create(self, *args, **kw):
            await asyncio.Event().wait()

    stuck = EventRecorder(Hung(), "announce-now")  # type: ignore[arg-type]
    assert not await stuck.announce(obj, "Evicting", "evicting 2 pod(s)", type_="Warning", id="evict@1:def",
                                    timeout=0.2)
    assert stuck.counts["failed"] == 1 and stuck.waiting == 0
    items, _ = await kube.list(EVENTS, namespace)
    assert [e["note"] for e in items if e["regarding"]["name"] == "evictee"] == ["evicting 1 pod(s)"]
