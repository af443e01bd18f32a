"""The controller loop against a recording fake API (FakeClock, no sleeps):
writes only for changes, replacement budget refilled by time, invalid config
changes nothing."""

from __future__ import annotations

import copy

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.kube import NODES
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.teams.controller import TeamManager, setup

DOMAIN = "fleetkeeper.io"
TEAM = f"{DOMAIN}/team"


def node(name: str, *, team: str = "", cordoned: bool = False, rv: int = 1) -> dict:
    labels = {f"{DOMAIN}/pool": "gpu"}
    taints = []
    if team:
        labels[TEAM] = team
        taints.append({"key": TEAM, "value": team, "effect": "NoSchedule"})
    return {"metadata": {"name": name, "uid": name, "resourceVersion": str(rv), "labels": labels},
            "spec": {"taints": taints, "unschedulable": cordoned},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def configmap(text: str, rv: str) -> dict:
    return {"metadata": {"name": "fleetkeeper-teams", "namespace": "fk", "resourceVersion": rv},
            "data": {"config.yaml": text}}


class FakeKube:
    """Applies merge patches to an in-memory node store (the resourceVersion precondition checked, as the
    API server does); records every write."""

    metrics = None

    def __init__(self, nodes: list[dict]):
        self.nodes = {n["metadata"]["name"]: n for n in nodes}
        self.patches: list[str] = []
        self.bodies: list[dict] = []
        self.other_writes = 0

    async def patch(self, res, name, body, namespace=None, *, patch_type="merge", **kw):
        assert res == NODES and patch_type == "merge"
        n = copy.deepcopy(self.nodes[name])
        meta = body.get("metadata") or {}
        if meta.get("resourceVersion") not in (None, n["metadata"]["resourceVersion"]):
            raise errors.Conflict(409, "Conflict", "the object has been modified")
        for part in ("labels", "annotations"):
            for k, v in (meta.get(part) or {}).items():
                d = n["metadata"].setdefault(part, {})
                if v is None:
                    d.pop(k, None)
                else:
                    d[k] = v
        for k, v in (body.get("spec") or {}).items():
            if v is None:
                n["spec"].pop(k, None)
            else:
                n["spec"][k] = v
        n["metadata"]["resourceVersion"] = str(int(n["metadata"]["resourceVersion"]) + 1)
        self.nodes[name] = n
        self.patches.append(name)
        self.bodies.append(body)
        return n

    async def apply(self, res, body, **kw):
        self.other_writes += 1
        return body

    async def create(self, res, body, namespace=None, **kw):
        self.other_writes += 1
        return body

    async def get_or_none(self, *a, **kw):
        return None


async def make(nodes: list[dict], text: str | None):
    kube = FakeKube(nodes)
    clock = FakeClock()
    mgr = Manager(kube, RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=clock)
    await setup(mgr, {"webhook": {"enabled": False}})
    tm: TeamManager = mgr.teams
    if text is not None:
        tm.configmaps._apply("ADDED", configmap(text, "1"))
    for n in nodes:
        tm.nodes._apply("ADDED", n)
    return kube, clock, mgr, tm


def sync(tm: TeamManager, kube: FakeKube) -> None:
    """Feed the fake API's current nodes back into the cache (what the watch does)."""
    for n in kube.nodes.values():
        tm.nodes._apply("MODIFIED", copy.deepcopy(n))


def teams(kube: FakeKube) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in kube.nodes.values():
        t = n["metadata"]["labels"].get(TEAM)
        if t:
            out[t] = out.get(t, 0) + 1
    return out


CFG = """teams:
  - {team: a, nodeSelector: {fleetkeeper.io/pool: gpu}, count: 3}
replacement: {maxNodes: 1, windowSeconds: 60}
"""


async def reconcile(tm, kube):
    tm._await_cache = _noop  # the fake API has no watch; sync() plays it
    await tm.reconcile("teams")
    sync(tm, kube)


async def _noop(*a, **kw):
    return None


async def test_writes_only_what_changes_and_zero_at_steady_state():
    kube, clock, mgr, tm = await make([node(f"n{i}") for i in range(6)], CFG)
    await reconcile(tm, kube)
    assert teams(kube) == {"a": 3} and len(kube.patches) == 3
    await reconcile(tm, kube)
    await reconcile(tm, kube)
    assert len(kube.patches) == 3
    assert mgr.registry.get_sample_value("fleetkeeper_teams_node_writes_total", {"action": "assign", "result": "ok"}) == 3


async def test_replacements_are_rate_limited_by_the_clock():
    nodes = [node(f"n{i}", team="a") for i in range(3)] + [node(f"m{i}") for i in range(3)]
    kube, clock, mgr, tm = await make(nodes, CFG)
    await reconcile(tm, kube)
    assert kube.patches == []
    for name in ("n0", "n1"):  # two team nodes get cordoned
        kube.nodes[name]["spec"]["unschedulable"] = True
        kube.nodes[name]["metadata"]["resourceVersion"] = "9"
    sync(tm, kube)
    await reconcile(tm, kube)
    assert len(kube.patches) == 2  # one replacement taken + its unhealthy node released
    assert mgr.registry.get_sample_value("fleetkeeper_teams_replacements_throttled_total") == 1
    await reconcile(tm, kube)
    assert len(kube.patches) == 2  # budget spent: nothing more inside the window
    await clock.advance(61)
    await reconcile(tm, kube)
    assert len(kube.patches) == 4
    healthy_a = [n for n, o in kube.nodes.items() if o["metadata"]["labels"].get(TEAM) == "a"
                 and not o["spec"]["unschedulable"]]
    assert len(healthy_a) == 3


async def test_invalid_config_changes_nothing_and_is_reported():
    kube, clock, mgr, tm = await make([node(f"n{i}") for i in range(4)], CFG)
    await reconcile(tm, kube)
    assert teams(kube) == {"a": 3}
    tm.configmaps._apply("MODIFIED", configmap("teams: [{team: a, count: -5}]", "2"))
    await reconcile(tm, kube)
    assert teams(kube) == {"a": 3} and len(kube.patches) == 3
    assert mgr.registry.get_sample_value("fleetkeeper_teams_config_valid") == 0
    assert any(r == "ConfigInvalid" and "teams[0].count" in note for _, _, r, note in tm.recorder.emitted)
    assert "teams[0].count" in tm.status(None)["config"]["error"]
    tm.configmaps._apply("MODIFIED", configmap(CFG.replace("count: 3", "count: 1"), "3"))
    await reconcile(tm, kube)
    assert teams(kube) == {"a": 1}


async def test_no_configmap_changes_nothing():
    kube, clock, mgr, tm = await make([node("n0", team="a"), node("n1")], None)
    await reconcile(tm, kube)
    assert kube.patches == [] and teams(kube) == {"a": 1}


async def test_dry_run_writes_nothing():
    kube = FakeKube([node(f"n{i}") for i in range(3)])
    mgr = Manager(kube, RuntimeSettings(namespace="fk", dry_run=True, server={"port": 0}),
                  registry=CollectorRegistry(), clock=FakeClock())
    await setup(mgr, {"webhook": {"enabled": False}})
    tm = mgr.teams
    tm.configmaps._apply("ADDED", configmap(CFG, "1"))
    for n in kube.nodes.values():
        tm.nodes._apply("ADDED", n)
    await reconcile(tm, kube)
    assert kube.patches == [] and kube.other_writes == 0
    assert mgr.registry.get_sample_value("fleetkeeper_teams_node_writes_total",
                                         {"action": "assign", "result": "dry_run"}) == 3


@pytest.mark.parametrize("bad", ["webhook: {port: -1}", "colour: red"])
async def test_bad_options_are_config_errors(bad):
    import yaml

    mgr = Manager(FakeKube([]), RuntimeSettings(server={"port": 0}), registry=CollectorRegistry())
    with pytest.raises(errors.ConfigError):
        await setup(mgr, yaml.safe_load(bad))


async def test_dry_run_serves_but_does_not_register_the_webhook(tmp_path):
    mgr = Manager(FakeKube([]), RuntimeSettings(namespace="fk", dry_run=True, server={"port": 0}),
                  registry=CollectorRegistry(), clock=FakeClock())
    await setup(mgr, {"webhook": {"certDir": str(tmp_path)}})
    assert mgr.teams_webhook.opts.register_webhook is False
    assert (tmp_path / "tls.crt").exists() and mgr.teams_webhook.ca_bundle.startswith(b"-----BEGIN CERTIFICATE")


W = "fleetkeeper_node_writes_total"


async def test_every_node_write_goes_through_the_core_applier():
    kube, clock, mgr, tm = await make([node(f"n{i}", rv=4) for i in range(4)], CFG)
    await reconcile(tm, kube)
    assert mgr.registry.get_sample_value(W, {"component": "teams", "action": "assign", "result": "success"}) == 3
    # one merge patch per node, with the cached node's resourceVersion (no GET, no JSON patch)
    assert all(b["metadata"]["resourceVersion"] == "4" for b in kube.bodies)
    # a stale cache: the applier's Conflict makes the pass plan again
    kube.nodes["n3"]["metadata"]["resourceVersion"] = "9"  # changed behind the cache's back
    kube.nodes["n0"]["spec"]["unschedulable"] = True
    kube.nodes["n0"]["metadata"]["resourceVersion"] = "9"
    tm.nodes._apply("MODIFIED", copy.deepcopy({**kube.nodes["n0"]}))
    with pytest.raises(errors.Temporary):
        await reconcile(tm, kube)
    assert mgr.registry.get_sample_value(W, {"component": "teams", "action": "replace", "result": "conflict"}) == 1


async def test_dry_run_goes_through_the_applier_and_writes_nothing():
    kube = FakeKube([node(f"n{i}") for i in range(3)])
    mgr = Manager(kube, RuntimeSettings(namespace="fk", dry_run=True, server={"port": 0}),
                  registry=CollectorRegistry(), clock=FakeClock())
    await setup(mgr, {"webhook": {"enabled": False}})
    mgr.teams.configmaps._apply("ADDED", configmap(CFG, "1"))
    for n in kube.nodes.values():
        mgr.teams.nodes._apply("ADDED", n)
    await reconcile(mgr.teams, kube)
    assert kube.patches == []
    assert mgr.registry.get_sample_value(W, {"component": "teams", "action": "assign", "result": "dry_run"}) == 3


async def test_the_replacement_rate_limit_survives_a_restart():
    nodes = [node(f"n{i}", team="a") for i in range(3)] + [node(f"m{i}") for i in range(3)]
    kube, clock, mgr, tm = await make(nodes, CFG)
    for name in ("n0", "n1"):
        kube.nodes[name]["spec"]["unschedulable"] = True
        kube.nodes[name]["metadata"]["resourceVersion"] = "9"
    sync(tm, kube)
    await reconcile(tm, kube)
    assert len(kube.patches) == 2  # one replacement (maxNodes 1) and its node released
    replaced = [n for n, o in kube.nodes.items() if "fleetkeeper.io/team-replaced-at" in o["metadata"].get("annotations", {})]
    assert len(replaced) == 1
    # a new process (the leader moved): the window is read from the nodes, not from memory
    kube2 = FakeKube([copy.deepcopy(n) for n in kube.nodes.values()])
    kube2_clock_now = clock.now()
    _, clock2, mgr2, tm2 = await make(list(kube2.nodes.values()), CFG)
    tm2.mgr.clock = clock  # same wall clock as the first process
    tm2.kube = tm2.applier.kube = kube2
    await reconcile(tm2, kube2)
    assert kube2.patches == [] and clock.now() == kube2_clock_now
    await clock.advance(61)
    await reconcile(tm2, kube2)
    assert len(kube2.patches) == 2


async def test_replacements_are_held_while_health_quarantines_spend_the_shared_budget():
    from fleetkeeper.lifecycle.config import BudgetConfig, Limit
    from fleetkeeper.lifecycle.controller import shared_budget

    nodes = [node(f"n{i}", team="a") for i in range(3)] + [node(f"m{i}") for i in range(4)]
    for q in ("m2", "m3"):  # health quarantined two spares: what it writes
        nodes[int(q[1]) + 3]["spec"]["taints"] = [{"key": "fleetkeeper.io/quarantine", "value": "xid",
                                                    "effect": "NoSchedule"}]
    kube, clock, mgr, tm = await make(nodes, CFG.replace("maxNodes: 1", "maxNodes: 5"))
    shared_budget(mgr).configure(BudgetConfig(cluster=Limit(max_nodes=2), rack=Limit(max_nodes=9),
                                              zone=Limit(max_percent=100), max_new_per_window=None))
    kube.nodes["n0"]["spec"]["unschedulable"] = True
    kube.nodes["n0"]["metadata"]["resourceVersion"] = "9"
    sync(tm, kube)
    await reconcile(tm, kube)
    assert kube.patches == [] and tm.last_plan.budget_held == ["n0"]
    assert tm.status(tm.last_plan)["heldByDisruptionBudget"] == ["n0"]
    assert any(r == "TeamReplacementHeld" and "used up in cluster" in note for _, _, r, note in tm.recorder.emitted)
    assert len(shared_budget(mgr).ledger) == 0
    # a quarantine is lifted: the budget has room, the replacement is made and holds no unit afterwards
    kube.nodes["m3"]["spec"]["taints"] = []
    kube.nodes["m3"]["metadata"]["resourceVersion"] = "9"
    sync(tm, kube)
    await reconcile(tm, kube)
    assert sorted(kube.patches) == ["m0", "n0"] and tm.last_plan.budget_held == []
    assert len(shared_budget(mgr).ledger) == 0


class ChangingKube(FakeKube):
    """The first patch of a node in ``changes`` finds it changed since the cache saw it (another writer
    got there first); the watch delivers that change to the cache when ``deliver`` says."""

    def __init__(self, nodes: list[dict], changes: dict, deliver: dict[str, str]):
        super().__init__(nodes)
        self.changes, self.deliver, self.tm = dict(changes), deliver, None
        self.refused: list[str] = []

    async def patch(self, res, name, body, namespace=None, **kw):
        change = self.changes.pop(name, None)
        if change is not None:
            n = self.nodes[name]
            change(n)
            n["metadata"]["resourceVersion"] = str(int(n["metadata"]["resourceVersion"]) + 1)
        for changed, at in self.deliver.items():
            if at == name:  # the watch event of an earlier change arrives now
                self.tm.nodes._apply("MODIFIED", copy.deepcopy(self.nodes[changed]))
        try:
            return await super().patch(res, name, body, namespace, **kw)
        except errors.Conflict:
            self.refused.append(name)
            raise


def heartbeat(n: dict) -> None:
    n["status"]["conditions"] = [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "kubelet is posting ready status"}]


def cordon(n: dict) -> None:
    n["spec"]["unschedulable"] = True


async def make_changing(changes: dict, deliver: dict[str, str]):
    nodes = [node(f"n{i}", rv=4) for i in range(3)]
    kube = ChangingKube(nodes, changes, deliver)
    clock = FakeClock()
    mgr = Manager(kube, RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=clock)
    await setup(mgr, {"webhook": {"enabled": False}})
    tm: TeamManager = mgr.teams
    kube.tm = tm
    tm.configmaps._apply("ADDED", configmap(CFG, "1"))
    for n in nodes:
        tm.nodes._apply("ADDED", copy.deepcopy(n))
    return kube, mgr, tm


@pytest.mark.parametrize("deliver_at", ["n1", "n2"])  # with the Conflict; after it, before the pass ends
async def test_a_conflict_from_a_change_the_plan_does_not_read_is_sent_again_in_the_same_pass(deliver_at):
    kube, mgr, tm = await make_changing({"n1": heartbeat}, {"n1": deliver_at})
    await reconcile(tm, kube)  # no Temporary: nothing is left for another pass
    assert kube.refused == ["n1"]
    assert sorted(kube.patches) == ["n0", "n1", "n2"]  # each node written once
    # against the node as it is now (the newer version the cache holds), with no new plan
    assert {n: b["metadata"]["resourceVersion"] for n, b in zip(kube.patches, kube.bodies)} == \
        {"n0": "4", "n1": "5", "n2": "4"}
    assert teams(kube) == {"a": 3}
    assert mgr.registry.get_sample_value(W, {"component": "teams", "action": "assign", "result": "conflict"}) == 1
    assert mgr.registry.get_sample_value(W, {"component": "teams", "action": "assign", "result": "success"}) == 3
    assert tm.writes == 3


async def test_a_conflict_from_a_change_the_plan_reads_waits_for_the_next_pass():
    kube, mgr, tm = await make_changing({"n1": cordon}, {"n1": "n1"})
    with pytest.raises(errors.Temporary):
        await reconcile(tm, kube)
    assert kube.refused == ["n1"] and sorted(kube.patches) == ["n0", "n2"]  # the cordoned node is not written


async def test_a_conflict_the_cache_has_not_seen_by_the_end_of_the_pass_waits_for_the_next_pass():
    kube, mgr, tm = await make_changing({"n1": heartbeat}, {})
    with pytest.raises(errors.Temporary):
        await reconcile(tm, kube)
    assert kube.refused == ["n1"] and sorted(kube.patches) == ["n0", "n2"]
    sync(tm, kube)
    await reconcile(tm, kube)  # the next pass plans from the watched node
    assert sorted(kube.patches) == ["n0", "n1", "n2"] and teams(kube) == {"a": 3}
