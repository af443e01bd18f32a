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

    async def one_shot():
        return None

    async def loop():
        while True:
            ticks.append(1)
            await asyncio.sleep(0.01)

    mgr.add("once", one_shot)
    mgr.add("loop", loop)
    task = asyncio.create_task(mgr.run())
    await asyncio.sleep(0.2)
    assert not task.done()
    assert len(ticks) > 3
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
