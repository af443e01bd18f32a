import asyncio
from types import SimpleNamespace

import pytest

from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings


def manager() -> Manager:
    settings = RuntimeSettings(dry_run=True, server={"port": 0})
    return Manager(SimpleNamespace(metrics=None), settings)


async def test_one_shot_runnable_does_not_stop_the_manager():
    mgr = manager()
    ticks = []
    returned = asyncio.Event()

    async def one_shot():
        returned.set()
        return None

    async def loop():
        while True:
            ticks.append(1)
            await asyncio.sleep(0.01)

    mgr.add("once", one_shot)
    mgr.add("loop", loop)
    task = asyncio.create_task(mgr.run())
    await asyncio.wait_for(returned.wait(), 60)
    seen = len(ticks)
    for _ in range(6000):  # the loop keeps running after the one-shot returned (counted, not timed)
        if len(ticks) > seen + 3:
            break
        await asyncio.sleep(0.01)
    assert len(ticks) > seen + 3
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_failing_runnable_stops_the_manager_with_its_error():
    mgr = manager()

    async def broken():
        raise RuntimeError("boom")

    async def loop():
        await asyncio.sleep(60)

    mgr.add("broken", broken)
    mgr.add("loop", loop)
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(mgr.run(), 5)


async def test_a_slow_first_sync_is_waited_for_not_a_failure(caplog):
    """An informer still listing after the report interval: the manager keeps
    waiting (naming it in the log) and starts its controllers once it is synced."""
    mgr = manager()
    mgr.sync_report_interval = 0.05
    release = asyncio.Event()

    class SlowInformer:
        resource = SimpleNamespace(plural="pods")
        synced = False
        _ev = asyncio.Event()

        async def run(self):
            await release.wait()
            SlowInformer.synced = True
            self._ev.set()
            await asyncio.Event().wait()

        async def wait_synced(self, timeout=None):
            await asyncio.wait_for(self._ev.wait(), timeout)

    mgr._informers[("pods",)] = SlowInformer()
    started = asyncio.Event()

    async def controller():
        started.set()
        await asyncio.Event().wait()

    mgr.add("c", controller, leader=False)
    mgr.add("leader-c", lambda: started.wait(), leader=True)
    with caplog.at_level("WARNING", logger="fleetkeeper.manager"):
        task = asyncio.create_task(mgr.run())
        for _ in range(6000):  # until the wait has been reported at least twice
            if caplog.text.count("still waiting: pods") >= 2:
                break
            await asyncio.sleep(0.01)
    assert caplog.text.count("still waiting: pods") >= 2
    assert not task.done()
    release.set()
    await asyncio.wait_for(started.wait(), 60)
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_controllers_do_not_wait_for_an_ungated_informer():
    """A read-only consumer's informer (the fleet map's) that is still listing does not hold the
    controllers back; a gated one does."""
    from fleetkeeper.core.kube import EVENTS, NODES

    mgr = manager()
    gated = mgr.informer(NODES, lambda o: o, key="gated")
    ungated = mgr.informer(EVENTS, lambda o: o, key="map", gate=False)

    async def never_syncs():
        await asyncio.Event().wait()
    gated.run = ungated.run = never_syncs  # type: ignore[method-assign]  # listing forever
    started = asyncio.Event()

    async def controller():
        started.set()
        await asyncio.Event().wait()
    mgr.add("controller", controller)
    task = asyncio.create_task(mgr.run())
    await asyncio.sleep(0.2)
    assert not started.is_set()  # the gated informer is not synced yet
    gated._synced.set()
    await asyncio.wait_for(started.wait(), 60)  # the ungated one never synced
    assert not ungated.synced
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_second_projection_of_one_stream_follows_the_first():
    """One list+watch per resource and selector: another projection of nodes is fed by the first
    nodes informer; another selector, or an informer already running, gets its own."""
    from fleetkeeper.core.kube import NODES, PODS

    mgr = manager()
    views = mgr.node_informer()
    agent = mgr.informer(NODES, lambda o: o["metadata"]["name"], key="agent")
    assert agent is not views and agent.lead is views
    assert mgr.informer(NODES, lambda o: o, key="agent") is agent  # same key: the same informer
    third = mgr.informer(NODES, lambda o: o, key="third")
    assert third.lead is views  # followers always follow the lead, never another follower
    gpu = mgr.informer(NODES, lambda o: o, label_selector="pool=gpu", key="gpu")
    assert gpu.lead is None  # another selector: another stream
    pods = mgr.pod_informer()
    pods._started = True  # already listing: a new projection cannot see its first LIST
    assert mgr.informer(PODS, lambda o: o, key="late").lead is None
