"""The plan vocabulary, the node patch it folds into, the shared informer index and the ConfigMap loader."""

import pytest

from fleetkeeper.core import errors
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.plan import (
    AddTaint,
    Cordon,
    Event,
    EvictPod,
    Plan,
    RemoveTaint,
    RequeueAfter,
    SetAnnotation,
    SetLabel,
    TerminateMachine,
    node_patch,
)
from fleetkeeper.core.resources import PODS
from fleetkeeper.core.views import NodeView, Taint, default_projector


def node(taints=(), labels=None, annotations=None, unschedulable=False, rv="7"):
    return NodeView("n1", "uid-1", rv, dict(labels or {}), dict(annotations or {}),
                    tuple(Taint(*t) for t in taints), unschedulable, (), 8, 1000, 0.0, False)


@pytest.mark.parametrize("ops,have,want", [
    # adds a taint to the cached list, with the cached resourceVersion
    ([AddTaint("d/q", "gpu", "NoSchedule")], dict(taints=[("other", "", "NoExecute")]),
     {"metadata": {"resourceVersion": "7"},
      "spec": {"taints": [{"key": "other", "effect": "NoExecute"},
                          {"key": "d/q", "value": "gpu", "effect": "NoSchedule"}]}}),
    # already true: nothing to write
    ([AddTaint("d/q", "gpu")], dict(taints=[("d/q", "gpu", "NoSchedule")]), None),
    ([RemoveTaint("d/q"), SetAnnotation("d/a", None)], dict(), None),
    # the last taint removed: the list is cleared
    ([RemoveTaint("d/q")], dict(taints=[("d/q", "", "NoSchedule")]),
     {"metadata": {"resourceVersion": "7"}, "spec": {"taints": None}}),
    # labels and annotations: only what changes
    ([SetLabel("d/l", "x"), SetLabel("d/k", "same"), SetAnnotation("d/a", None)],
     dict(labels={"d/k": "same"}, annotations={"d/a": "old"}),
     {"metadata": {"resourceVersion": "7", "labels": {"d/l": "x"}, "annotations": {"d/a": None}}}),
    ([Cordon()], dict(), {"metadata": {"resourceVersion": "7"}, "spec": {"unschedulable": True}}),
    ([Cordon(False)], dict(unschedulable=True), {"metadata": {"resourceVersion": "7"}, "spec": {"unschedulable": None}}),
    ([Cordon(False)], dict(), None),
])
def test_node_patch_is_one_minimal_patch_with_the_cached_resource_version(ops, have, want):
    assert node_patch(node(**have), ops) == want


def test_plan_splits_and_describes_its_operations():
    p = Plan("n1", "drain", (AddTaint("d/q"), EvictPod("ns", "a", "gang g"), TerminateMachine("reboot"),
                             Event("Draining", "why"), RequeueAfter(30), RequeueAfter(5)))
    assert p.node_ops == (AddTaint("d/q"),)
    assert [e.key for e in p.evictions] == ["ns/a"]
    assert p.machine == TerminateMachine("reboot")
    assert p.requeue_after == 5
    assert not p.empty and Plan("n1", "x", (RequeueAfter(1),)).empty
    text = p.describe()
    assert text[0] == "taint d/q=:NoSchedule" and "evict ns/a (gang g)" in text and "reboot the machine" in text


def _pod(name, node_name, ns="default"):
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": name + node_name},
            "spec": {"nodeName": node_name}, "status": {"phase": "Running"}}


def test_informer_index_follows_adds_moves_and_deletes_before_handlers_run():
    inf = Informer(None, PODS, default_projector("d").pod)  # type: ignore[arg-type]
    inf._apply("ADDED", _pod("a", "n1"))
    idx = inf.index("node", lambda p: (p.node,) if p.node else ())  # filled from what is cached
    seen = []
    inf.add_handler(lambda typ, key, old, new: seen.append([p.name for p in inf.by("node", "n2")]))
    inf._apply("ADDED", _pod("b", "n2"))
    assert seen[-1] == ["b"]  # the handler already sees the new pod in the index
    assert [p.name for p in idx.get("n1")] == ["a"]
    inf._apply("MODIFIED", _pod("a", "n2"))
    assert idx.get("n1") == [] and sorted(p.name for p in idx.get("n2")) == ["a", "b"]
    inf._apply("DELETED", _pod("b", "n2"))
    assert [p.name for p in idx.get("n2")] == ["a"]
    assert inf.index("node") is idx  # shared by name
    with pytest.raises(KeyError):
        inf.index("missing")


def _parse(text, source):
    if text is None:
        return {"default": True}
    if text == "bad":
        raise errors.ConfigError(source, [("x", text, "not allowed")])
    return {"text": text}


def test_configmap_loader_missing_map_is_defaults_missing_key_and_bad_text_are_errors():
    src = ConfigMapKey(None, "ns", "cm", "config.yaml", _parse)  # type: ignore[arg-type]
    assert src.parse_data(None) == {"default": True}
    with pytest.raises(errors.ConfigError, match="missing key 'config.yaml'"):
        src.parse_data({"data": {"other": "1"}})
    with pytest.raises(errors.ConfigError, match="configmap ns/cm key config.yaml"):
        src.parse_data({"data": {"config.yaml": "bad"}})
    assert src.parse_data({"data": {"config.yaml": "ok"}}) == {"text": "ok"}


class _FakeKube:
    """Only what ConfigMapKey reads (a unit test of the loader's rules, not of the API)."""

    def __init__(self):
        self.cm = None
        self.fail = False

    async def get_or_none(self, res, name, ns):
        if self.fail:
            raise errors.ApiUnreachable("down")
        return self.cm


async def test_configmap_reload_keeps_the_last_good_configuration():
    kube = _FakeKube()
    src = ConfigMapKey(kube, "ns", "cm", "k", _parse)  # type: ignore[arg-type]
    assert await src.load() == {"default": True}
    kube.cm = {"data": {"k": "v1"}}
    assert await src.reload() == {"text": "v1"}
    assert await src.reload() is None  # unchanged
    kube.cm = {"data": {"k": "bad"}}
    assert await src.reload() is None and src.last_good == {"text": "v1"}
    kube.cm = {"data": {}}
    assert await src.reload() is None and src.last_good == {"text": "v1"}
    kube.fail = True
    assert await src.reload() is None and src.last_good == {"text": "v1"}


def test_configmap_offer_applies_the_same_rules_to_watched_versions():
    src = ConfigMapKey(None, "ns", "cm", "k", _parse)  # type: ignore[arg-type]
    assert src.offer(None) == {"default": True} and src.error is None
    assert src.offer({"data": {"k": "v1"}}) == {"text": "v1"}
    assert src.offer({"data": {"k": "v1"}}) is None  # unchanged
    assert src.offer({"data": {"k": "bad"}}) is None and src.last_good == {"text": "v1"}
    assert "x" in str(src.error) and "not allowed" in str(src.error)
    assert src.offer({"data": {"j": "v2"}}) is None and "missing key 'k'" in str(src.error)
    assert src.offer({"data": {"k": "v2"}}) == {"text": "v2"} and src.error is None


def test_a_rewritten_taint_list_keeps_the_time_added_of_the_taints_it_keeps():
    raw = {"metadata": {"name": "n1", "resourceVersion": "3"},
           "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
                                "timeAdded": "2026-01-01T00:00:00Z"}]}}
    view = default_projector("d").node(raw)
    assert node_patch(view, [AddTaint("d/q", "x")])["spec"]["taints"] == [
        {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"},
        {"key": "d/q", "value": "x", "effect": "NoSchedule"}]


async def test_a_component_applying_its_configmap_at_start_reports_later_versions_and_keeps_its_own(caplog):
    import asyncio

    from fleetkeeper.core.clock import FakeClock
    from fleetkeeper.core.configmap import watch_at_start_only

    kube, clock = _FakeKube(), FakeClock()
    kube.cm = {"data": {"k": "v1"}}
    src = ConfigMapKey(kube, "ns", "cm", "k", _parse)  # type: ignore[arg-type]
    assert await src.load() == {"text": "v1"}
    task = asyncio.create_task(watch_at_start_only(src, clock.sleep, 30.0))
    try:
        kube.cm = {"data": {"k": "bad"}}
        await clock.advance(31)
        assert src.last_good == {"text": "v1"} and "not allowed" in str(src.error)
        assert any("rejected" in r.getMessage() and "x" in r.getMessage() for r in caplog.records)
        kube.cm = {"data": {"k": "v2"}}
        await clock.advance(31)
        assert src.error is None and any("until the next start" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
