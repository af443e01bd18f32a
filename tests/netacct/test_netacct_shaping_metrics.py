"""Shaping decisions, tc parsing/planning, and the exporter's accounting."""

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from fleetkeeper.core.domain import Names
from fleetkeeper.netacct import shaping as S
from fleetkeeper.netacct.iptables import parse_save
from fleetkeeper.netacct.metrics import ShapedBucket, TrafficCollector
from fleetkeeper.netacct.pods import PodInfo

DATA = Path(__file__).parent / "data"
N = Names()
ANN = N.egress_limit


def pod(ns, name, team="", limit=None, ip="10.0.0.1"):
    return PodInfo(ns, name, ip, team, {ANN: limit} if limit is not None else {})


def test_limits_precedence_namespace_team_annotation():
    pods = [pod("ml", "a", "vision", "20mbit"), pod("ml", "b", "vision"), pod("rl", "c", "vision"),
            pod("rl", "d", "robots"), pod("rl", "e", "vision", "2mbit"), pod("free", "f", "", "30mbit")]
    lim = S.resolve_limits(pods, N, {"vision": "5mbit"}, {"ml": "50mbit"}, {})
    # ml/a stays in the namespace's shared bucket: a bucket of its own would add 20mbit to ml's 50mbit
    assert lim.pod_bucket == {"ml/a": "ns:ml", "ml/b": "ns:ml", "rl/c": "pod:rl/c", "rl/e": "pod:rl/e",
                              "free/f": "pod:free/f"}
    assert lim.buckets["ns:ml"].rate_bps == 50_000_000 and lim.buckets["ns:ml"].scope == "namespace"
    assert lim.buckets["pod:rl/c"].rate_bps == 5_000_000
    # lowering the team limit is the author's right; no policy: the annotation is the limit
    assert lim.buckets["pod:rl/e"].rate_bps == 2_000_000 and lim.buckets["pod:rl/e"].source == "annotation"
    assert lim.buckets["pod:free/f"].rate_bps == 30_000_000
    assert [(p.pod, p.value) for p in lim.problems] == [("a", "20mbit")]
    assert "shares one limit of 50mbit" in lim.problems[0].message


@pytest.mark.parametrize("ns_limits,team_limits,want_bucket,want_bps,words", [
    ({"ml": "50mbit"}, {}, "ns:ml", 50_000_000, "not applied"),          # above the namespace limit
    ({}, {"vision": "5mbit"}, "pod:ml/a", 5_000_000, "may only lower team vision's limit of 5mbit"),
])
def test_an_annotation_never_raises_the_policy_limit(ns_limits, team_limits, want_bucket, want_bps, words):
    lim = S.resolve_limits([pod("ml", "a", "vision", "10gbit")], N, team_limits, ns_limits, {})
    assert lim.pod_bucket["ml/a"] == want_bucket and lim.buckets[want_bucket].rate_bps == want_bps
    assert words in lim.problems[0].message


def test_malformed_annotation_is_reported_and_keeps_what_works():
    pods = [pod("ml", "a", "vision", "20 megabits"), pod("ml", "b", limit="0mbit"), pod("ml", "c", limit="fast")]
    lim = S.resolve_limits(pods, N, {"vision": "25mbit"}, {}, previous={"pod:ml/a": 20_000_000})
    assert [(p.pod, p.value) for p in lim.problems] == [("a", "20 megabits"), ("b", "0mbit"), ("c", "fast")]
    assert "egress-limit" in str(lim.problems[0]) and "ignored" in str(lim.problems[0])
    assert lim.buckets["pod:ml/a"].rate_bps == 20_000_000 and lim.buckets["pod:ml/a"].source == "kept"
    assert "ml/b" not in lim.pod_bucket and "ml/c" not in lim.pod_bucket
    # a kept value never exceeds a team limit lowered since
    lim = S.resolve_limits(pods[:1], N, {"vision": "5mbit"}, {}, previous={"pod:ml/a": 20_000_000})
    assert lim.buckets["pod:ml/a"].rate_bps == 5_000_000


def test_allocation_is_stable_and_bounded():
    b = {k: S.Bucket(k, 8000, "pod", "ns") for k in ("pod:a/x", "pod:a/y", "pod:a/z")}
    ids, over = S.allocate(b, {"pod:a/y": 1, "pod:gone/q": 2}, max_id=3)
    assert ids == {"pod:a/y": 1, "pod:a/x": 2, "pod:a/z": 3} and over == []
    ids, over = S.allocate(b, {}, max_id=2)
    assert len(ids) == 2 and over == ["pod:a/z"]


def test_observed_bucket_ids_from_mark_comments():
    d = parse_save((DATA / "iptables-nft-save-c.txt").read_text())
    assert S.observed_bucket_ids(d) == {"pod:ml/pod-a": 1}


def recorded_tc():
    return S.parse_tc(*((DATA / f).read_text() for f in ("tc-qdisc-show.txt", "tc-class-show.txt",
                                                          "tc-filter-show.txt")))


def test_parse_recorded_tc():
    st = recorded_tc()
    assert st.ours and st.filters == set()
    c = st.classes[1]
    assert c.rate_bps == 8_000_000 and c.sent_bytes == 209446 and c.sent_packets == 143 and c.overlimits == 17 and c.dropped == 0


def test_plan_tc():
    st = recorded_tc()
    assert S.plan_tc("up0", {1: 8_000_000}, st) == []
    cmds = S.plan_tc("up0", {1: 16_000_000, 2: 8_000_000}, st)
    assert cmds[0].startswith("class replace dev up0 parent fee7: classid fee7:1 htb rate 16000000bit")
    assert any("classid fee7:2 htb rate 8000000bit ceil 8000000bit" in c for c in cmds)
    assert not any(c.startswith("filter") for c in cmds)
    assert S.plan_tc("up0", {}, st) == ["qdisc del dev up0 root"]
    gone = S.plan_tc("up0", {2: 8_000_000}, st)
    assert gone[0] == "class del dev up0 classid fee7:1"
    st.filters = {7}  # a filter in our qdisc that fleetkeeper never makes: removed
    assert S.plan_tc("up0", {1: 8_000_000}, st) == [
        "filter del dev up0 parent fee7: protocol ip prio 10 handle 800::7 u32"]
    fresh = S.plan_tc("eth0", {1: 8_000_000}, S.TcState(root_kind="mq", root_handle="0:"))
    assert fresh[0] == "qdisc replace dev eth0 root handle fee7: htb default 0"
    with pytest.raises(S.ForeignQdisc, match="did not install"):
        S.plan_tc("eth0", {1: 8_000_000}, S.TcState(root_kind="htb", root_handle="1:"))
    assert S.plan_tc("eth0", {}, S.TcState(root_kind="mq", root_handle="0:")) == []


SAVE = """*mangle
:FLEETKEEPER-ACCT-INET-OUT - [0:0]
:FLEETKEEPER-ACCT-INTERNAL - [0:0]
[{p1}:{b1}] -A FLEETKEEPER-ACCT-INET-OUT -s 10.1.0.2/32 -m comment --comment "iptables-exporter fleetkeeper traffic=internet-out ns=ml pod=a team=vision"
{extra}[{p3}:{b3}] -A FLEETKEEPER-ACCT-INET-OUT -m comment --comment "iptables-exporter fleetkeeper traffic=internet-out scope=pods"
[9:900] -A FLEETKEEPER-ACCT-INET-OUT -m comment --comment "iptables-exporter somebody-else traffic=internet-out ns=ml pod=a"
COMMIT
"""
B_RULE = ('[{p2}:{b2}] -A FLEETKEEPER-ACCT-INET-OUT -s 10.1.0.3/32 -m comment --comment '
          '"iptables-exporter fleetkeeper traffic=internet-out ns=ml pod=b team=vision"\n')


def snap(p1, b1, p3, b3, b=None):
    extra = B_RULE.format(p2=b[0], b2=b[1]) if b else ""
    return parse_save(SAVE.format(p1=p1, b1=b1, p3=p3, b3=b3, extra=extra))


def val(reg, name, **labels):
    v = reg.get_sample_value(name, labels)
    return v


def test_collector_is_monotonic_across_pod_churn_and_resets():
    reg = CollectorRegistry()
    tc = TrafficCollector(reg)
    tc.observe(snap(1, 100, 3, 300, b=(2, 200)))
    assert val(reg, "fleetkeeper_netacct_namespace_bytes_total", direction="internet-out", namespace="ml") == 300
    assert val(reg, "fleetkeeper_netacct_pod_bytes_total", direction="internet-out", namespace="ml", pod="b",
               team="vision") == 200
    # pod b leaves; a's counter grows
    tc.observe(snap(2, 150, 4, 450))
    assert val(reg, "fleetkeeper_netacct_namespace_bytes_total", direction="internet-out", namespace="ml") == 350
    assert val(reg, "fleetkeeper_netacct_team_bytes_total", direction="internet-out", team="vision") == 350
    assert val(reg, "fleetkeeper_netacct_pod_bytes_total", direction="internet-out", namespace="ml", pod="b",
               team="vision") is None
    # a's rule was recreated (counter reset to 20)
    tc.observe(snap(1, 20, 5, 470))
    assert val(reg, "fleetkeeper_netacct_namespace_bytes_total", direction="internet-out", namespace="ml") == 370
    assert val(reg, "fleetkeeper_netacct_node_bytes_total", direction="internet-out", scope="pods") == 470
    text = generate_latest(reg).decode()
    assert "somebody-else" not in text


def test_pod_series_are_capped_or_off():
    reg = CollectorRegistry()
    tc = TrafficCollector(reg, max_pod_series=1)
    tc.observe(snap(1, 100, 3, 300, b=(2, 200)))
    assert val(reg, "fleetkeeper_netacct_pod_series_dropped") == 1
    pods = [s for m in reg.collect() if m.name == "fleetkeeper_netacct_pod_bytes" for s in m.samples]
    assert len(pods) == 1
    reg2 = CollectorRegistry()
    TrafficCollector(reg2, pod_series=False).observe(snap(1, 100, 3, 300))
    assert "fleetkeeper_netacct_pod_bytes_total" not in generate_latest(reg2).decode()
    assert val(reg2, "fleetkeeper_netacct_namespace_bytes_total", direction="internet-out", namespace="ml") == 100


def test_shaping_stats_are_exported_monotonic():
    reg = CollectorRegistry()
    tc = TrafficCollector(reg)
    tc.observe_shaping({"pod:ml/a": ShapedBucket("pod", "ml", "a", 8_000_000, 1000, 10, 2, 5)})
    tc.observe_shaping({"pod:ml/a": ShapedBucket("pod", "ml", "a", 8_000_000, 100, 1, 0, 1)})  # class recreated
    lab = {"scope": "pod", "namespace": "ml", "pod": "a"}
    assert val(reg, "fleetkeeper_netacct_shaping_sent_bytes_total", **lab) == 1100
    assert val(reg, "fleetkeeper_netacct_shaping_dropped_packets_total", **lab) == 2
    assert val(reg, "fleetkeeper_netacct_shaping_overlimits_total", **lab) == 6
    assert val(reg, "fleetkeeper_netacct_shaping_limit_bits_per_second", **lab) == 8_000_000
    tc.observe_shaping({})
    assert val(reg, "fleetkeeper_netacct_shaping_sent_bytes_total", **lab) is None
