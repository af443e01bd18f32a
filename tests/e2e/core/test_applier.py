"""The one applier on the real API server: one cache-guarded patch, Conflict when the cache is behind,
dry-run writes nothing, an Event per action, fleetkeeper_node_writes_total."""

from __future__ import annotations

import secrets

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.applier import Applier
from fleetkeeper.core.events import EventRecorder
from fleetkeeper.core.kube import EVENTS, NODES
from fleetkeeper.core.plan import AddTaint, Event, Plan, SetAnnotation, SetLabel, TerminateMachine
from fleetkeeper.core.views import default_projector


class RecordingProvider:
    name = "recording"

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []

    async def terminate(self, node: str, *, dry_run: bool = False) -> str:
        self.calls.append((node, dry_run))
        return "recorded"


async def test_applier_patch_conflict_dry_run_event_and_metric(kube):
    name = f"applier-{secrets.token_hex(3)}"
    await kube.create(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    proj = default_projector("fleetkeeper.io")
    reg = CollectorRegistry()
    provider = RecordingProvider()
    dry = {"on": True}
    ap = Applier(kube, EventRecorder(kube, "test"), component="test", registry=reg, dry_run=lambda: dry["on"],
                 provider=provider)
    again = None
    try:
        view = proj.node(await kube.get(NODES, name))
        plan = Plan(name, "quarantine", (AddTaint("fleetkeeper.io/quarantine", "x"),
                                         SetLabel("fleetkeeper.io/l", "v"), SetAnnotation("fleetkeeper.io/a", "1"),
                                         TerminateMachine("terminate"), Event("Quarantined", "because", id="q@1")))
        # dry-run: nothing written, the provider asked with dry_run, a "would" Event
        await ap.apply(view, plan)
        # announced again by a restarted process (a fresh recorder): still one "would" Event
        assert await ap.recorder.flush(60)
        again = Applier(kube, EventRecorder(kube, "test"), component="test", registry=CollectorRegistry(),
                        dry_run=True, provider=RecordingProvider())
        await again.apply(view, plan)
        assert await again.recorder.flush(60) and again.recorder.counts["existing"] == 1
        live = await kube.get(NODES, name)
        assert not any(t["key"] == "fleetkeeper.io/quarantine" for t in (live.get("spec") or {}).get("taints") or [])
        assert provider.calls == [(name, True)]
        assert reg.get_sample_value("fleetkeeper_node_writes_total",
                                    {"component": "test", "action": "quarantine", "result": "dry_run"}) == 1
        # for real: one patch with everything
        dry["on"] = False
        view = proj.node(await kube.get(NODES, name))
        done = await ap.apply(view, plan)
        assert done.patched and done.machine == "recorded" and provider.calls[-1] == (name, False)
        live = await kube.get(NODES, name)
        assert {"key": "fleetkeeper.io/quarantine", "value": "x", "effect": "NoSchedule"} in live["spec"]["taints"]
        assert live["metadata"]["labels"]["fleetkeeper.io/l"] == "v"
        assert live["metadata"]["annotations"]["fleetkeeper.io/a"] == "1"
        # the same (now stale) view again: the cache is behind, nothing is written twice
        with pytest.raises(errors.Temporary):
            await ap.apply(view, Plan(name, "quarantine", (SetAnnotation("fleetkeeper.io/a", "2"),)))
        assert (await kube.get(NODES, name))["metadata"]["annotations"]["fleetkeeper.io/a"] == "1"
        assert reg.get_sample_value("fleetkeeper_node_writes_total",
                                    {"component": "test", "action": "quarantine", "result": "conflict"}) == 1
        # already true: no write at all
        fresh = proj.node(await kube.get(NODES, name))
        rv = fresh.resource_version
        assert not (await ap.apply(fresh, Plan(name, "quarantine", (SetLabel("fleetkeeper.io/l", "v"),)))).patched
        assert (await kube.get(NODES, name))["metadata"]["resourceVersion"] == rv
        assert await ap.recorder.flush(60)  # Events are written off the write path
        items, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name={name}")
        # the applier's own Events (the node controller may add RegisteredNode for the new Node)
        ours = [e["reason"] for e in items if e.get("reportingController") == "fleetkeeper.io/test"]
        assert sorted(ours) == ["DryRunQuarantined", "Quarantined"]
    finally:
        # stop the recorders' writers: a writer still running when the test ends is a leaked task
        await ap.recorder.close(60)
        if again is not None:
            await again.recorder.close(60)
        try:
            await kube.delete(NODES, name)
        except errors.NotFound:
            pass


class FailingProvider:
    name = "failing"

    def __init__(self):
        self.fail = True

    async def terminate(self, node: str, *, dry_run: bool = False) -> str:
        if self.fail:
            raise errors.Temporary("the provider's API timed out", 1.0)
        return "terminated"


async def test_a_provider_failure_after_the_record_keeps_the_events_and_a_check_is_no_second_success(kube):
    """The node patch records the request, then the provider fails: the plan's Event is still emitted
    (a retry, which sees the record, never announces it again), with the failure; asking the machine
    layer again later is counted as a check, not a second termination."""
    name = f"applier-{secrets.token_hex(3)}"
    await kube.create(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    proj = default_projector("fleetkeeper.io")
    reg = CollectorRegistry()
    provider = FailingProvider()
    ap = Applier(kube, EventRecorder(kube, "test"), component="test", registry=reg, dry_run=lambda: False,
                 provider=provider)
    try:
        view = proj.node(await kube.get(NODES, name))
        retire = Plan(name, "terminate", (AddTaint("fleetkeeper.io/quarantine", "retiring"),
                                          SetAnnotation("fleetkeeper.io/terminate-requested", "1"),
                                          TerminateMachine("terminate"), Event("Retiring", "worn out", "Warning")))
        with pytest.raises(errors.Temporary):
            await ap.apply(view, retire)
        live = await kube.get(NODES, name)
        assert live["metadata"]["annotations"]["fleetkeeper.io/terminate-requested"] == "1"
        assert await ap.recorder.flush(60)  # Events are written off the write path
        items, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name={name}")
        ours = sorted(e["reason"] for e in items if e.get("reportingController") == "fleetkeeper.io/test")
        assert ours == ["MachineActionFailed", "Retiring"]
        # the retry path: the record is on the node, the machine layer is asked again and answers
        provider.fail = False
        check = Plan(name, "terminate-check", (TerminateMachine("terminate"),))
        assert (await ap.apply(proj.node(live), check)).machine == "terminated"
        sample = lambda result: reg.get_sample_value(  # noqa: E731
            "fleetkeeper_node_writes_total", {"component": "test", "action": "terminate", "result": result})
        # success: the node patch that recorded the request (the same action name); the machine: one
        # error, then one check, never a success of its own
        assert sample("error") == 1 and sample("checked") == 1 and sample("success") == 1
    finally:
        await ap.recorder.close(60)  # a writer still running when the test ends is a leaked task
        try:
            await kube.delete(NODES, name)
        except errors.NotFound:
            pass
