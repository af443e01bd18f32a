"""The agent's side of node-local actions: fenced by node and uid, performed once per nonce
(across agent restarts and reboots), reported; the GPU reset with the GPU backend and the
command runner swapped (no GPU here)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core.domain import Names
from fleetkeeper.core.faults import FaultPlan, parse_fault
from fleetkeeper.health.actions import ActionAgent, ActionKeys, DoneLog, HostActions, Report, new_request
from fleetkeeper.health.agent import SimulatedActions
from fleetkeeper.health.gpu import FakeGpuBackend
from fleetkeeper.health.metrics import AgentMetrics

N = Names()
K = ActionKeys(N)


class FakeKube:
    def __init__(self):
        self.patches: list[tuple[str, dict]] = []

    async def patch(self, res, name, body, *a, **kw):
        self.patches.append((name, body))
        return {}


class Runner:
    def __init__(self, rc=0, out="GPU 00000000:10:00.0 was successfully reset."):
        self.calls: list[list[str]] = []
        self.rc, self.out = rc, out

    async def __call__(self, argv):
        self.calls.append(argv)
        return self.rc, self.out


def reports(kube):
    return [Report.loads(b["metadata"]["annotations"][K.result]) for _, b in kube.patches]


def ann(req):
    return {K.request: req.dumps()}


async def test_reset_all_or_one_gpu_once_and_reported(tmp_path):
    kube, run = FakeKube(), Runner()
    be = HostActions(FakeGpuBackend.healthy(8), runner=run)
    agent = ActionAgent(kube, N, be, DoneLog(tmp_path / "done.json", tmp_path / "boot_id"), lambda: 5.0)
    (tmp_path / "boot_id").write_text("boot-1\n")
    req = new_request("reset", "gpu-7", "uid-7", 0, 600)
    rep = await agent.handle("gpu-7", "uid-7", ann(req))
    assert rep.outcome == "succeeded" and "reset 8 GPU(s)" in rep.message
    assert run.calls == [["nvidia-smi", "--gpu-reset"]]
    assert reports(kube)[0].nonce == req.nonce
    # the same request again (the watch repeats it; the result annotation not yet seen): not again
    again = await ActionAgent(kube, N, be, DoneLog(tmp_path / "done.json", tmp_path / "boot_id"),
                              lambda: 6.0).handle("gpu-7", "uid-7", ann(req))
    assert run.calls == [["nvidia-smi", "--gpu-reset"]]
    assert again == rep  # the same report, said again
    # started, then the agent died before its report: reported failed, never performed again
    lost = new_request("reset", "gpu-7", "uid-7", 0, 600)
    DoneLog(tmp_path / "done.json", tmp_path / "boot_id").record(lost.nonce)
    rep2 = await agent.handle("gpu-7", "uid-7", ann(lost))
    assert rep2.outcome == "failed" and "interrupted" in rep2.message and len(run.calls) == 1
    # once the result is on the node, nothing at all
    assert await agent.handle("gpu-7", "uid-7", {**ann(req), K.result: rep.dumps()}) is None
    one = new_request("reset", "gpu-7", "uid-7", 0, 600, gpu="3")
    await agent.handle("gpu-7", "uid-7", ann(one))
    assert run.calls[-1] == ["nvidia-smi", "--gpu-reset", "-i", "3"]


async def test_fenced_to_its_own_node_and_uid(tmp_path):
    kube, run = FakeKube(), Runner()
    agent = ActionAgent(kube, N, HostActions(FakeGpuBackend.healthy(8), runner=run), DoneLog(None), lambda: 1.0)
    req = new_request("reset", "gpu-7", "uid-7", 0, 600)
    assert await agent.handle("gpu-8", "uid-8", ann(req)) is None
    assert await agent.handle("gpu-7", "uid-NEW", ann(req)) is None  # a new Node with the old name
    assert run.calls == [] and kube.patches == []


async def test_failures_are_reported_not_retried(tmp_path):
    kube = FakeKube()
    run = Runner(rc=255, out="Unable to reset GPU: in use by another client")
    agent = ActionAgent(kube, N, HostActions(FakeGpuBackend.healthy(8), runner=run), DoneLog(None), lambda: 1.0)
    rep = await agent.handle("n", "u", ann(new_request("reset", "n", "u", 0, 600)))
    assert rep.outcome == "failed" and "in use" in rep.message
    lost = FakeGpuBackend.healthy(2)
    agent2 = ActionAgent(kube, N, HostActions(lost, runner=Runner()), DoneLog(None), lambda: 1.0)
    rep2 = await agent2.handle("n", "u", ann(new_request("reset", "n", "u", 0, 600, gpu="5")))
    assert rep2.outcome == "failed" and "GPU 5 not found" in rep2.message
    assert len(kube.patches) == 2


async def test_reboot_reported_by_the_agent_after_the_boot(tmp_path):
    kube, run = FakeKube(), Runner(out="")
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1")
    done = tmp_path / "done.json"
    agent = ActionAgent(kube, N, HostActions(FakeGpuBackend.healthy(8), runner=run), DoneLog(done, boot),
                        lambda: 1.0)
    req = new_request("reboot", "n", "u", 0, 600)
    await agent.handle("n", "u", ann(req))
    assert run.calls == [["nsenter", "-t", "1", "-m", "-u", "-i", "-n", "--", "systemctl", "reboot"]]
    assert kube.patches == []  # not yet: the machine is going down
    assert json.loads(done.read_text()) == {req.nonce: {"boot": "boot-1", "report": None}}
    # the agent restarts before the reboot happened: nothing
    assert await ActionAgent(kube, N, HostActions(FakeGpuBackend.healthy(8), runner=run), DoneLog(done, boot),
                             lambda: 2.0).handle("n", "u", ann(req)) is None
    boot.write_text("boot-2")  # after the boot
    rep = await ActionAgent(kube, N, HostActions(FakeGpuBackend.healthy(8), runner=run), DoneLog(done, boot),
                            lambda: 3.0).handle("n", "u", ann(req))
    assert rep.outcome == "succeeded" and "new boot id" in rep.message
    assert len(run.calls) == 1 and reports(kube)[0].nonce == req.nonce


async def test_simulated_actions_clear_what_they_fix(tmp_path):
    plan = FaultPlan(tmp_path / "faults.json")
    for f in ("xid:79", "ecc-stuck", "disk-io"):
        plan.inject("n", parse_fault(f))
    sim = SimulatedActions(plan)
    msg = await sim.perform(new_request("reboot", "n", "u", 0, 60))
    assert "xid:79" in msg
    assert [str(f) for f in plan.faults("n")] == ["ecc-stuck", "disk-io"]
    plan.inject("n", parse_fault("ecc"))
    await sim.perform(new_request("reset", "n", "u", 0, 60))
    assert [str(f) for f in plan.faults("n")] == ["ecc-stuck", "disk-io"]
    with pytest.raises(ValueError):
        await sim.perform(new_request("dance", "n", "u", 0, 60))


async def test_every_action_taken_is_counted_by_action_and_outcome(tmp_path):
    reg = CollectorRegistry()
    metrics = AgentMetrics(reg)

    def taken(action, outcome):
        return reg.get_sample_value("fleetkeeper_health_agent_node_actions_total",
                                    {"action": action, "outcome": outcome}) or 0

    kube = FakeKube()
    ok = ActionAgent(kube, N, HostActions(FakeGpuBackend.healthy(8), runner=Runner()), DoneLog(None), lambda: 1.0,
                     metrics=metrics)
    req = new_request("reset", "n", "u", 0, 600)
    await ok.handle("n", "u", ann(req))
    await ok.handle("n", "u", ann(req))  # the same request again: not taken again, not counted again
    assert taken("reset", "succeeded") == 1
    bad = ActionAgent(kube, N, HostActions(FakeGpuBackend.healthy(8), runner=Runner(rc=255, out="in use")),
                      DoneLog(None), lambda: 1.0, metrics=metrics)
    await bad.handle("n", "u", ann(new_request("reset", "n", "u", 0, 600)))
    assert taken("reset", "failed") == 1
    dry = ActionAgent(kube, N, HostActions(FakeGpuBackend.healthy(8), runner=Runner()), DoneLog(None), lambda: 1.0,
                      dry_run=True, metrics=metrics)
    await dry.handle("n", "u", ann(new_request("reset", "n", "u", 0, 600)))
    assert taken("reset", "dry-run") == 1 and taken("reset", "succeeded") == 1
