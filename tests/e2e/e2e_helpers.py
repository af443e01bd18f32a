"""Helpers every end-to-end test folder shares (``tests/e2e`` is on ``sys.path`` through
its conftest): polling for a condition with a generous bound, stopping a manager task,
reading a taint and the Events about a node, making KWOK nodes of a test's own."""

from __future__ import annotations

import asyncio
import time

from fleetkeeper.core import errors
from fleetkeeper.core.events import flush_all
from fleetkeeper.core.kube import EVENTS, NODES
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest


async def wait_for(fn, timeout: float = 60.0, what: str = "condition", interval: float = 0.3):
    """Poll ``fn`` until it returns something truthy; the bound is for a stuck controller,
    not a speed verdict."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def until_webhook_answers(kube, res, body: dict, namespace: str | None, answered, what: str,
                                timeout: float = 60.0) -> dict:
    """Wait until the API server calls a webhook just registered. It learns of webhook configurations
    through a watch of its own, which on a loaded control plane lags by more than a second; an object
    created before then is admitted without the webhook. A server-side dry run of ``body`` (nothing is
    stored) is repeated until ``answered(the API server's answer)`` shows the webhook's work. A call that
    fails inside the API server ("failed calling webhook": a registration it still has whose server is not
    serving, or gone) is not an answer yet either."""
    async def seen():
        try:
            obj = await kube.create(res, body, namespace, dry_run=True)
        except errors.ApiError as exc:
            if "failed calling webhook" in str(exc):
                return None
            raise
        return obj if answered(obj) else None
    return await wait_for(seen, timeout, what=f"the API server calling {what}")


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def taint(node: dict, key: str) -> dict | None:
    return next((t for t in (node.get("spec") or {}).get("taints") or [] if t["key"] == key), None)


async def events_for(kube, node: str) -> list[dict]:
    """The Events about ``node``, after this process's recorders wrote out what they hold (Events are
    written off the write path, so an action can be visible before its Event)."""
    await flush_all(60)
    items, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name={node}")
    return items


async def create_nodes(kube, prefix: str, n: int, labels: dict[str, str], *, racks: int = 1,
                       made: list[str] | None = None) -> list[str]:
    """``n`` KWOK GPU nodes named ``prefix``-..., with ``labels``; returns their names once each is
    Ready and the node lifecycle controller's start-up taints are gone. ``made`` collects the names
    as they are created (for the caller's clean-up, also when the wait fails)."""
    spec = FleetSpec(nodes=n, prefix=prefix, cpu_fraction=0.0, nodes_per_rack=max(1, n // racks))
    names: list[str] = []
    for i in range(n):
        m = node_manifest(spec, i)
        m["metadata"]["labels"].update(labels)
        await kube.create(NODES, m)
        names.append(m["metadata"]["name"])
        if made is not None:
            made.append(m["metadata"]["name"])

    async def settled():
        for name in names:
            node = await kube.get(NODES, name)
            ready = any(c["type"] == "Ready" and c["status"] == "True"
                        for c in (node.get("status") or {}).get("conditions") or [])
            if not ready or (node.get("spec") or {}).get("taints"):
                return False
        return True
    await wait_for(settled, 60, f"nodes {prefix}-... Ready and untainted")
    return names
