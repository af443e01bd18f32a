"""The relay's overload decisions (pure): when a request is refused with 503 and
how long Retry-After is, the agent's backoff schedule, the relist spread after
a relay restart, and the open-file limit judged against the agents expected."""

from __future__ import annotations

import random

import pytest

from fleetkeeper.relay.admission import (
    FD_HEADROOM,
    AdmissionPolicy,
    BackoffPolicy,
    admit,
    open_files_plan,
    relist_delay,
    retry_delay,
)

P = AdmissionPolicy(max_inflight=100, max_lag=1.0, min_retry_after=1, max_retry_after=60)


def test_admits_when_not_behind():
    d = admit(0, 0.0, P)
    assert d.admit and d.retry_after == 0
    assert admit(99, 1.0, P).admit  # at the bounds, not over


def test_refuses_when_the_loop_runs_late_with_retry_after_twice_the_lag():
    d = admit(0, 4.2, P)
    assert not d.admit
    assert d.cause == "lag"
    assert d.retry_after == 9  # ceil(2 * 4.2)
    assert "4.2s behind" in d.reason


def test_retry_after_grows_with_the_backlog_and_is_bounded():
    small, big, huge = admit(0, 1.1, P), admit(0, 10.0, P), admit(0, 1000.0, P)
    assert small.retry_after == 3 and big.retry_after == 20
    assert huge.retry_after == 60  # max_retry_after


def test_refuses_over_the_inflight_bound():
    d = admit(100, 0.0, P)
    assert not d.admit and d.cause == "inflight"
    assert d.retry_after == 1
    assert admit(350, 0.0, P).retry_after == 4  # ceil(350 / 100)


def test_lag_is_judged_before_inflight():
    assert admit(500, 2.0, P).cause == "lag"


B = BackoffPolicy(base=0.5, cap=30.0, relist_spread=10.0, max_retry_after=300.0)


def test_backoff_window_doubles_to_the_cap_with_full_jitter():
    # u close to 1: the top of each window
    tops = [retry_delay(n, 0.999999, B) for n in range(1, 10)]
    assert [round(t, 2) for t in tops] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    # u = 0.5: the middle of the window, never under base / 2
    assert retry_delay(1, 0.5, B) == 0.25
    assert retry_delay(5, 0.5, B) == 4.0
    assert retry_delay(5, 0.0, B) == 0.25
    assert retry_delay(10_000, 0.5, B) == 15.0  # no overflow for a long outage


def test_backoff_spreads_a_herd():
    rng = random.Random(1)
    delays = [retry_delay(6, rng.random(), B) for _ in range(7500)]
    assert min(delays) >= 0.25 and max(delays) <= 16.0
    # full jitter: spread over the whole window, not bunched at its top
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(16)]
    assert max(per_second) < 2 * 7500 / 16


def test_retry_after_is_honoured_and_spread_over_r_to_2r():
    assert retry_delay(1, 0.0, B, retry_after=7) == 7.0
    assert retry_delay(1, 0.999, B, retry_after=7) == pytest.approx(13.993)
    assert retry_delay(3, 0.5, B, retry_after=1000) == 450.0  # capped at max_retry_after, then spread
    assert retry_delay(3, 0.5, B, retry_after=0) == retry_delay(3, 0.5, B)  # 0: no advice


def test_attempt_counts_failures_from_one():
    with pytest.raises(ValueError):
        retry_delay(0, 0.5, B)


def test_relist_after_a_relay_restart_is_spread_and_otherwise_immediate():
    assert relist_delay(False, 0.9, B) == 0.0
    assert relist_delay(True, 0.0, B) == 0.0
    assert relist_delay(True, 0.5, B) == 5.0
    rng = random.Random(2)
    delays = [relist_delay(True, rng.random(), B) for _ in range(7500)]
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(10)]
    assert sum(per_second) == 7500 and max(per_second) < 1000  # ~750 a second, not 7,500 at once


def test_open_files_soft_limit_is_raised_to_the_hard_one():
    plan = open_files_plan(1024, 1_048_576, 7500)
    assert plan.soft == 1_048_576
    assert plan.level == "info" and plan.needed == 2 * 7500 + FD_HEADROOM


def test_open_files_below_a_reconnect_is_a_warning_below_the_fleet_an_error():
    assert open_files_plan(1024, 20_000, 7500).level == "info"  # 20,000 >= 2 * 7,500 + 1,024
    warn = open_files_plan(1024, 12_000, 7500)
    assert warn.level == "warning" and warn.soft == 12_000 and "16024" in warn.message
    err = open_files_plan(1024, 4096, 7500)
    assert err.level == "error" and "cannot hold 7500 agents" in err.message


def test_open_files_without_an_expected_count_or_with_no_hard_limit():
    assert open_files_plan(1024, 4096, 0).level == "info"
    assert open_files_plan(1024, 4096, 0).soft == 4096
    assert open_files_plan(1024, -1, 7500).soft == 65_536
    assert open_files_plan(200_000, -1, 7500).soft == 200_000  # never lowered


def test_request_timeout_doubles_after_each_timeout_up_to_the_cap():
    from fleetkeeper.relay.admission import request_timeout

    assert [request_timeout(10.0, n, B) for n in range(6)] == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert request_timeout(10.0, 10_000, B) == 60.0
    assert request_timeout(90.0, 3, B) == 90.0  # a base above the cap is kept, never shortened
