"""The health scenario of ``make demo`` is sized from the policy and the fleet,
so its outcome is decided by the product's rules, not by timing: the ladder's
faults fit in the disruption budget, and the burst outgrows what is left of
the budget while staying below the fault-storm threshold (at 60 nodes a burst
of 16 after 4 ladder faults crossed the threshold of 20 and a storm pause,
not the budget, held it back, when the detector saw it at once)."""

from __future__ import annotations

import pytest

from fleetkeeper.health.decide import storm_threshold
from fleetkeeper.health.demo import CASES, sizes
from fleetkeeper.health.policy import Policy, load_policy


@pytest.mark.parametrize("total", [20, 60, 100, 200, 1000, 7500])
def test_the_ladder_fits_the_budget_and_the_burst_outgrows_it_below_the_storm_threshold(total):
    policy = Policy()
    s = sizes(total, int(total * 0.9), policy)
    assert s is not None
    limit = policy.budget.cluster.limit(total)
    assert 1 <= s.cases <= min(limit, len(CASES))
    assert s.headroom == limit - s.cases
    assert s.burst > s.headroom  # some of the burst must wait for the budget
    assert s.cases + s.burst < storm_threshold(total, policy)  # and no storm pause may decide instead


def test_the_xid_case_with_pods_to_evict_comes_first():
    assert CASES[0][0] == "xid:79"  # a budget of one node still shows the eviction


def test_a_policy_whose_storm_threshold_leaves_no_room_for_a_burst_skips():
    tight = load_policy("storm: {min_nodes: 2, max_percent: 0}\n")
    assert sizes(200, 180, tight) is None  # 1 ladder fault + a burst beyond the budget would be a storm
    assert sizes(200, 3, Policy()) is None  # too few healthy GPU nodes
