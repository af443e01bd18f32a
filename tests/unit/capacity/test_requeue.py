"""Repairing a gang kube-scheduler stopped trying: when a requeue pod is made and when it goes."""

from __future__ import annotations

import dataclasses

from fleetkeeper.capacity import requeue as rq
from fleetkeeper.capacity import yielding as yd
from fleetkeeper.core.domain import Names

from test_yielding import NOW, N, balloon, decide, gang, node, waiting, work

AFTER = 20.0


def units(pods):
    return yd.units(pods, -1000)


def probe(group: str, *, tried: bool = False, created: float = NOW - 1, deleting: bool = False) -> yd.WaitingPod:
    p = waiting(f"{group}-requeue-x", gang=group, gpus=0, unschedulable=tried, created=created)
    return dataclasses.replace(p, requeue_for=group, deleting=deleting)


def test_a_gang_that_fits_and_stays_unplaced_gets_one_requeue_pod_after_the_threshold():
    us = units(gang("train", 2))
    first = rq.decide(us, {"ns/train"}, [], {}, {}, NOW, AFTER)
    assert first.create == [] and first.fits_since == {"ns/train": NOW}
    early = rq.decide(us, {"ns/train"}, [], first.fits_since, {}, NOW + AFTER - 1, AFTER)
    assert early.create == []
    due = rq.decide(us, {"ns/train"}, [], first.fits_since, {}, NOW + AFTER, AFTER)
    assert due.create == [("ns", "train", AFTER)]


def test_no_requeue_pod_while_one_exists_or_soon_after_the_last():
    us = units(gang("train", 2))
    since = {"ns/train": NOW - 100}
    assert rq.decide(us, {"ns/train"}, [probe("train")], since, {}, NOW, AFTER).create == []
    assert rq.decide(us, {"ns/train"}, [probe("train", deleting=True)], since, {}, NOW, AFTER).create == []
    assert rq.decide(us, {"ns/train"}, [], since, {"ns/train": NOW - 5}, NOW, AFTER).create == []
    assert rq.decide(us, {"ns/train"}, [], since, {"ns/train": NOW - AFTER}, NOW, AFTER).create


def test_a_gang_that_does_not_fit_is_left_to_the_scheduler_and_its_clock_restarts():
    us = units(gang("train", 2))
    plan = rq.decide(us, set(), [], {"ns/train": NOW - 100}, {}, NOW, AFTER)
    assert plan.create == [] and plan.fits_since == {}


def test_single_pods_are_not_requeued():
    us = units([waiting("solo")])
    assert rq.decide(us, {"ns/pod/solo"}, [], {"ns/pod/solo": NOW - 100}, {}, NOW, AFTER).create == []


def test_requeue_pods_go_once_tried_or_when_their_gang_is_placed():
    us = units(gang("train", 2))
    since = {"ns/train": NOW - 100}
    tried = rq.decide(us, {"ns/train"}, [probe("train", tried=True)], since, {}, NOW, AFTER)
    assert [(ns, why) for ns, _, why in tried.delete] == [("ns", "the scheduler tried it (the group's cycle ran)")]
    placed = rq.decide([], set(), [probe("train")], {}, {}, NOW, AFTER)
    assert [why for *_, why in placed.delete] == ["its gang is placed or gone"]
    stale = rq.decide(us, set(), [probe("train", created=NOW - 3 * AFTER)], since, {}, NOW, AFTER)
    assert [why for *_, why in stale.delete] == ["not tried by the scheduler in time"]
    waiting_ = rq.decide(us, set(), [probe("train")], since, {}, NOW, AFTER)
    assert waiting_.delete == []


def test_turned_off_it_creates_nothing_but_still_cleans_up():
    us = units(gang("train", 2))
    plan = rq.decide(us, {"ns/train"}, [probe("train", tried=True)], {"ns/train": NOW - 100}, {}, NOW, None)
    assert plan.create == [] and len(plan.delete) == 1


def test_the_requeue_pod_joins_the_group_and_is_never_placed():
    body = rq.requeue_pod("ns", "train", Names())
    spec = body["spec"]
    assert spec["schedulingGroup"] == {"podGroupName": "train"}
    assert spec["nodeSelector"] == {yd.requeue_label(N): "never-placed"}
    assert body["metadata"]["labels"][yd.requeue_label(N)] == "train"
    assert N.gang not in body["metadata"]["labels"]  # not a member fleetkeeper counts, not seen by the gang webhook
    assert "nvidia.com/gpu" not in str(spec)
    # the projector reads it back as a requeue pod (and units() ignores it: no GPUs)
    obj = {"metadata": {**body["metadata"], "name": "train-requeue-abc", "uid": "u"}, "spec": spec, "status": {}}
    wp = yd.waiting_pod_projector(N)(obj)
    assert wp.requeue_for == "train" and units([wp]) == []


def test_yielding_reports_the_units_that_fit_now():
    nodes = [node(f"n{i}") for i in range(4)]
    out = decide(nodes, [work("busy", "n0"), work("busy2", "n1")], [balloon("n2")],
                 gang("fits", 2) + gang("big", 4, created=NOW - 120))
    assert out.fits == ["ns/fits"] and out.blocked == ["ns/big"]
