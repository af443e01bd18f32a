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


def state(fits=None, quiet_since=None, units_=(), last=None, count=None, free=None) -> rq.RequeueState:
    """A carried state: fitting since ``fits`` (in free room since ``free``, default the same) and showing no
    progress since ``quiet_since`` (per unit)."""
    st = rq.RequeueState(fits_since=dict(fits or {}), last=dict(last or {}), count=dict(count or {}),
                         free_since=dict(fits or {}) if free is None else dict(free))
    for u in units_:
        st.quiet[u.key] = (rq.progress(u), (quiet_since or {}).get(u.key, NOW - 1000))
    return st


def test_a_gang_that_fits_and_stays_unplaced_gets_one_requeue_pod_after_the_threshold():
    us = units(gang("train", 2))
    first = rq.decide(us, {"ns/train"}, [], state(units_=us), NOW, AFTER)
    assert first.create == [] and first.fits_since == {"ns/train": NOW}
    early = rq.decide(us, {"ns/train"}, [], first.state, NOW + AFTER - 1, AFTER)
    assert early.create == []
    due = rq.decide(us, {"ns/train"}, [], first.state, NOW + AFTER, AFTER)
    assert due.create == [("ns", "train", AFTER)]


def test_no_requeue_pod_while_one_exists_or_soon_after_the_last():
    us = units(gang("train", 2))
    fits = {"ns/train": NOW - 100}
    assert rq.decide(us, {"ns/train"}, [probe("train")], state(fits, units_=us), NOW, AFTER).create == []
    assert rq.decide(us, {"ns/train"}, [probe("train", deleting=True)], state(fits, units_=us), NOW,
                     AFTER).create == []
    assert rq.decide(us, {"ns/train"}, [], state(fits, units_=us, last={"ns/train": NOW - 5}), NOW,
                     AFTER).create == []
    assert rq.decide(us, {"ns/train"}, [], state(fits, units_=us, last={"ns/train": NOW - AFTER}), NOW,
                     AFTER).create


def test_a_gang_that_does_not_fit_is_left_to_the_scheduler_and_its_clock_restarts():
    us = units(gang("train", 2))
    plan = rq.decide(us, set(), [], state({"ns/train": NOW - 100}, units_=us), NOW, AFTER)
    assert plan.create == [] and plan.fits_since == {}


def test_single_pods_are_not_requeued():
    us = units([waiting("solo")])
    assert rq.decide(us, {"ns/pod/solo"}, [], state({"ns/pod/solo": NOW - 100}, units_=us), NOW,
                     AFTER).create == []


def test_requeue_pods_go_once_tried_or_when_their_gang_is_placed():
    us = units(gang("train", 2))
    fits = {"ns/train": NOW - 100}
    tried = rq.decide(us, {"ns/train"}, [probe("train", tried=True)], state(fits, units_=us), NOW, AFTER)
    assert [(ns, why) for ns, _, why in tried.delete] == [("ns", "the scheduler tried it (the group's cycle ran)")]
    placed = rq.decide([], set(), [probe("train")], rq.RequeueState(), NOW, AFTER)
    assert [why for *_, why in placed.delete] == ["its gang is placed or gone"]
    stale = rq.decide(us, set(), [probe("train", created=NOW - 3 * AFTER)], state(fits, units_=us), NOW, AFTER)
    assert [why for *_, why in stale.delete] == ["not tried by the scheduler in time"]
    waiting_ = rq.decide(us, set(), [probe("train")], state(fits, units_=us), NOW, AFTER)
    assert waiting_.delete == []


def test_turned_off_it_creates_nothing_but_still_cleans_up():
    us = units(gang("train", 2))
    plan = rq.decide(us, {"ns/train"}, [probe("train", tried=True)], state({"ns/train": NOW - 100}, units_=us),
                     NOW, None)
    assert plan.create == [] and len(plan.delete) == 1


# --- slow is not stuck -----------------------------------------------------------------------------------


def test_a_gang_the_scheduler_is_still_binding_or_retrying_is_not_requeued():
    pods = gang("train", 4)
    us = units(pods)
    fits = {"ns/train": NOW - 100}
    st = state(fits, units_=us)
    # one member was bound since the last pass (it left the unbound pods): progress, the clock restarts
    fewer = units(pods[1:])
    plan = rq.decide(fewer, {"ns/train"}, [], st, NOW, AFTER)
    assert plan.create == [] and plan.state.quiet["ns/train"][1] == NOW
    # the scheduler tried a member again with another outcome (new message): progress as well
    retried = units([dataclasses.replace(pods[0], scheduled_note="False|Unschedulable|0/40 nodes|t2"), *pods[1:]])
    assert rq.decide(retried, {"ns/train"}, [], st, NOW, AFTER).create == []
    # nothing moved for the threshold: stuck
    assert rq.decide(us, {"ns/train"}, [], st, NOW, AFTER).create == [("ns", "train", 100)]
    # and once progress is seen, it takes the full threshold of quiet again
    later = rq.decide(us, {"ns/train"}, [], plan.state, NOW + AFTER - 1, AFTER)
    assert later.create == []


def test_a_large_group_gets_time_for_its_cycle_before_it_counts_as_stuck():
    big = units(gang("big", 1000, gpus=8))
    fits = {"ns/big": NOW - 1000}
    per_member = 0.05  # a 1,000-member cycle: 50 s on top of the threshold
    quiet_for = {"ns/big": NOW - AFTER - 30}
    assert rq.decide(big, {"ns/big"}, [], state(fits, quiet_for, big), NOW, AFTER, per_member).create == []
    quiet_for = {"ns/big": NOW - AFTER - 50}
    assert rq.decide(big, {"ns/big"}, [], state(fits, quiet_for, big), NOW, AFTER, per_member).create
    # a small gang in the same state is requeued after the threshold alone (plus its few members)
    small = units(gang("small", 2))
    assert rq.decide(small, {"ns/small"}, [], state({"ns/small": NOW - 100}, {"ns/small": NOW - AFTER - 1},
                                                    small), NOW, AFTER, per_member).create


def test_repeated_requeues_without_progress_back_off():
    us = units(gang("train", 2))
    st = state({"ns/train": NOW - 10_000}, units_=us)
    made = []
    t = NOW
    while t < NOW + 1000:
        plan = rq.decide(us, {"ns/train"}, [], st, t, AFTER)
        st = plan.state
        if plan.create:
            rq.made(st, "ns/train", t)
            made.append(t - NOW)
        t += 1
    # the first at once, then 40, 80 and at most 160 s apart (8 x the threshold): 8 in 1,000 s instead of 50
    gaps = [b - a for a, b in zip(made, made[1:])]
    assert gaps[:3] == [40, 80, 160] and set(gaps[3:]) == {160}
    assert made[0] == 0 and len(made) == 8
    # progress resets the back-off
    moved = units([dataclasses.replace(p, scheduled_note="x") for p in us[0].pods])
    st2 = rq.decide(moved, {"ns/train"}, [], st, t, AFTER).state
    assert st2.count["ns/train"] == 0


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


# --- prompt retry: room freed for a gang that backs off --------------------------------------------------

KICK = 2.0


def test_a_gang_whose_room_freed_while_it_backs_off_is_retried_at_once_and_only_once():
    us = units(gang("train", 2))  # tried 30 s ago, found no room
    st = state({"ns/train": NOW - 3}, {"ns/train": NOW - 30}, us)  # room freed 3 s ago; nothing moved since
    plan = rq.decide(us, {"ns/train"}, [], st, NOW, AFTER, kick=KICK)
    assert plan.kick == [("ns", "train", 3)] and plan.create == []
    # the same episode is not retried twice (the requeue pod may be gone already)
    again = rq.decide(us, {"ns/train"}, [], plan.state, NOW + 5, AFTER, kick=KICK)
    assert again.kick == []
    # not before the delay, and not without the option
    assert rq.decide(us, {"ns/train"}, [], state({"ns/train": NOW - 1}, {"ns/train": NOW - 30}, us), NOW, AFTER,
                     kick=KICK).kick == []
    assert rq.decide(us, {"ns/train"}, [], st, NOW, AFTER).kick == []


def test_a_gang_that_fits_through_released_balloons_is_retried_once_they_are_gone():
    """Balloons released for a gang that backs off: its room frees when they are gone, not when fleetkeeper
    released them (a retry while they are still there fails and the gang backs off again)."""
    us = units(gang("train", 2))  # tried 30 s ago, found no room (the balloons held it)
    st = state({"ns/train": NOW - 10}, {"ns/train": NOW - 30}, us, free={})  # fits through balloons since -10
    released = rq.decide(us, {"ns/train"}, [], st, NOW, AFTER, kick=KICK, free=set())
    assert released.kick == [] and released.next_kick_in is None
    gone = rq.decide(us, {"ns/train"}, [], released.state, NOW + 1, AFTER, kick=KICK, free={"ns/train"})
    assert gone.kick == [] and gone.next_kick_in == KICK  # counted from when the room is free
    due = rq.decide(us, {"ns/train"}, [], gone.state, NOW + 1 + KICK, AFTER, kick=KICK, free={"ns/train"})
    assert due.kick == [("ns", "train", KICK)]  # the Event says: room freed 2 s ago
    # the yielding pass says which fits are free: placed without a release and on no node a released
    # balloon is still on
    nodes = [node(f"n{i}") for i in range(3)]
    out = decide(nodes, [], [balloon("n0"), balloon("n1", released=True)], gang("a", 1) + gang("b", 1))
    assert out.fits == ["ns/a", "ns/b"] and out.releases == []
    assert out.free == ["ns/b"]  # a went on n1 (best fit, then by name), where the released balloon still is


def test_no_prompt_retry_for_a_gang_the_scheduler_is_already_on():
    us = units(gang("train", 2))
    # it fitted from before its first try: the scheduler's own first cycle places it
    fitted_first = state({"ns/train": NOW - 40}, {"ns/train": NOW - 40}, us)
    assert rq.decide(us, {"ns/train"}, [], fitted_first, NOW, AFTER, kick=KICK).kick == []
    # it moved since the room freed (a member bound, or tried again)
    moved = state({"ns/train": NOW - 5}, {"ns/train": NOW - 1}, us)
    assert rq.decide(us, {"ns/train"}, [], moved, NOW, AFTER, kick=KICK).kick == []
    # a requeue pod of it is already there
    assert rq.decide(us, {"ns/train"}, [probe("train")], state({"ns/train": NOW - 3}, {"ns/train": NOW - 30}, us),
                     NOW, AFTER, kick=KICK).kick == []


def test_the_pass_comes_back_when_a_prompt_retry_falls_due():
    us = units(gang("train", 2))
    plan = rq.decide(us, {"ns/train"}, [], state({"ns/train": NOW - 0.5}, {"ns/train": NOW - 30}, us), NOW, AFTER,
                     kick=KICK)
    assert plan.kick == [] and plan.next_kick_in == 1.5


def test_a_gang_fleetkeeper_held_is_watched_only_from_when_it_is_handed_to_the_scheduler():
    """Held by fleetkeeper (no group object yet) for a minute: no progress all that time, by design. Its
    clocks start when its group object appears, so no requeue pod is made the moment it is let go (it may
    still be waiting its turn in the scheduler's active queue); one is made if it then shows no progress."""
    us = units(gang("train", 2))
    held = state(units_=us)  # quiet since NOW - 1000
    for t in (NOW, NOW + 30, NOW + 60):
        plan = rq.decide(us, {"ns/train"}, [], held, t, AFTER, handed=set())
        assert plan.create == [] and plan.kick == [] and "ns/train" not in plan.state.fits_since
        held = plan.state
    t0 = NOW + 60  # its PodGroup is there: the scheduler's now
    first = rq.decide(us, {"ns/train"}, [], held, t0, AFTER, handed={"ns/train"})
    assert first.create == [] and first.state.quiet["ns/train"][1] == t0
    early = rq.decide(us, {"ns/train"}, [], first.state, t0 + AFTER - 1, AFTER, handed={"ns/train"})
    assert early.create == []
    due = rq.decide(us, {"ns/train"}, [], early.state, t0 + AFTER, AFTER, handed={"ns/train"})
    assert due.create == [("ns", "train", AFTER)]
    # without the hand-over the same history would have made one at once (the behaviour before)
    assert rq.decide(us, {"ns/train"}, [], state({"ns/train": NOW}, units_=us), t0, AFTER).create
    # single pods are not gangs: ``handed`` does not filter them (they are never requeued anyway)
    solo = units([waiting("solo")])
    assert rq.decide(solo, {solo[0].key}, [], rq.RequeueState(), NOW, AFTER, handed=set()).state.fits_since


def test_a_gang_not_tried_yet_is_waiting_its_turn_not_stuck():
    """Handed to kube-scheduler and never tried (no member Unschedulable): it waits in the active queue behind
    other groups, however long; a requeue pod would be a cycle for nothing. Once tried and quiet, it is."""
    fresh = units([dataclasses.replace(p, tried=False) for p in gang("train", 2, unschedulable=False)])
    plan = rq.decide(fresh, {"ns/train"}, [], state({"ns/train": NOW - 1000}, units_=fresh), NOW, AFTER)
    assert plan.create == []
    tried = units(gang("train", 2))
    plan = rq.decide(tried, {"ns/train"}, [], state({"ns/train": NOW - 1000}, units_=tried), NOW, AFTER)
    assert plan.create == [("ns", "train", 1000)]
