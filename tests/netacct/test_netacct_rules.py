"""Parsing recorded iptables-save -c output (both back ends) and rule planning."""

import ipaddress
from pathlib import Path

import pytest

from fleetkeeper.netacct import rules as R
from fleetkeeper.netacct.iptables import canonical_tokens, parse_save, ParseError
from fleetkeeper.netacct.pods import PodInfo

DATA = Path(__file__).parent / "data"
NET8 = (ipaddress.IPv4Network("10.0.0.0/8"),)
# the pods and shaping the fixtures were recorded with (see data/README.md)
PODS = [PodInfo("ml", "pod-a", "10.1.0.2", "vision", {}), PodInfo("research", "pod-b", "10.2.0.2", "", {})]
MARKS = {"ml/pod-a": (1, "pod")}


def dump(backend):
    return parse_save((DATA / f"iptables-{backend}-save-c.txt").read_text())


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_parse_recorded_save(backend):
    d = dump(backend)
    assert set(d.tables) == {"filter", "mangle"}
    m = d.table("mangle")
    assert set(R.ALL_CHAINS) <= set(m.chains) and "KUBE-KUBELET-CANARY" in m.chains
    assert m.chains["FORWARD"].policy == "ACCEPT" and m.chains["FORWARD"].rules[0].packets > 0
    by_comment = {r.comment: r for r in m.rules()}
    out_a = by_comment["iptables-exporter fleetkeeper traffic=internet-out ns=ml pod=pod-a team=vision"]
    assert out_a.chain == R.CH_INET_OUT and out_a.bytes > 200_000 and out_a.target is None
    assert by_comment["cni: mark pod traffic"].target == "MARK"
    assert d.table("filter").chains["FORWARD"].rules[0].packets > 0


def test_parse_rejects_garbage_and_canonicalises():
    with pytest.raises(ParseError, match="line 1"):
        parse_save("-A FORWARD -j ACCEPT\n")
    with pytest.raises(ParseError, match="expected '-A CHAIN"):
        parse_save("*mangle\n-X FOO\nCOMMIT\n")
    assert canonical_tokens('-s 10.1.2.3 -m comment --comment "a b"') == (
        "-s", "10.1.2.3/32", "-m", "comment", "--comment", "a b")
    assert canonical_tokens("-m comment --comment d") == canonical_tokens('-m comment --comment "d"')


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_recorded_state_is_already_desired(backend):
    """What the agent wrote and the kernel saved reads back as exactly the desired
    state: a restart plans no change at all (no churn, counters kept)."""
    p = R.plan(R.desired_rules(PODS, NET8, MARKS), dump(backend))
    assert p.empty, p.summary()
    assert p.kept == 23


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_removed_pod_loses_exactly_its_rules(backend):
    p = R.plan(R.desired_rules(PODS[:1], NET8, MARKS), dump(backend))
    assert not p.create and not p.rewrite and not p.appends and not p.jump_inserts
    assert len(p.deletes) == 4 and all("10.2.0.2/32" in spec for _c, spec in p.deletes)
    payload = p.render()
    assert "KUBE" not in payload and "cni:" not in payload and ":FLEETKEEPER" not in payload
    assert payload.startswith("*mangle\n") and payload.endswith("COMMIT\n")


def test_new_pod_is_appended_without_touching_others():
    d = dump("nft")
    pods = PODS + [PodInfo("ml", "pod-c", "10.3.0.2", "vision", {})]
    p = R.plan(R.desired_rules(pods, NET8, MARKS), d)
    assert not p.deletes and len(p.appends) == 4
    assert all("10.3.0.2/32" in r.render() for r, _p, _b in p.appends)


def test_fresh_node_creates_chains_and_one_jump_per_hook():
    p = R.plan(R.desired_rules(PODS, NET8), parse_save("*mangle\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"))
    assert p.create == list(R.ALL_CHAINS)
    assert sorted(r.chain for r in p.jump_inserts) == ["FORWARD", "INPUT", "OUTPUT"]
    text = p.render()
    assert text.count(":FLEETKEEPER-ACCT-") == 8 and "-I FORWARD 1 -m comment --comment" in text


def test_duplicates_and_stale_chains_are_removed():
    d = dump("legacy")
    m = d.table("mangle")
    m.chains["FORWARD"].rules.append(m.chains["FORWARD"].rules[0])      # a second jump
    dup = m.chains[R.CH_INET_IN].rules[1]
    m.chains[R.CH_INET_IN].rules.append(dup)                              # a duplicate counting rule
    m.chains["FLEETKEEPER-ACCT-OLD"] = type(m.chains[R.CH_INET_IN])("FLEETKEEPER-ACCT-OLD", "-")
    p = R.plan(R.desired_rules(PODS, NET8, MARKS), d)
    assert p.jump_deletes == [("FORWARD", m.chains["FORWARD"].rules[0].spec)]
    assert p.deletes == [(R.CH_INET_IN, dup.spec)]
    assert p.drop_chains == ["FLEETKEEPER-ACCT-OLD"]


def test_changed_internal_ranges_rewrite_classification_and_keep_counters():
    d = dump("nft")
    nets = NET8 + (ipaddress.IPv4Network("172.16.0.0/12"),)
    p = R.plan(R.desired_rules(PODS, nets, MARKS), d)
    assert set(p.rewrite) == set(R.ORDERED_CHAINS)
    old = {r.tokens: (r.packets, r.bytes) for r in d.table("mangle").chains[R.CH_FORWARD].rules}
    fwd = p.rewrite[R.CH_FORWARD]
    first = fwd[0]
    assert (first[1], first[2]) == old[first[0].tokens] and first[2] > 0    # counter carried over
    assert any("172.16.0.0/12" in r.render() for r, _p, _b in fwd)
    assert not p.deletes and not p.appends                                  # counting rules untouched


def test_long_names_fit_the_comment_limit_and_stay_unique():
    a = PodInfo("ns", "p" * 250 + "a", "10.9.0.1", "t" * 63, {})
    b = PodInfo("ns", "p" * 250 + "b", "10.9.0.2", "t" * 63, {})
    ca, cb = R.pod_comment("internet-out", a), R.pod_comment("internet-out", b)
    assert len(ca) <= 255 and len(cb) <= 255 and ca != cb
    assert len(R.shape_comment(a, 4095, "namespace")) <= 255


def test_exporter_comment_convention():
    assert R.parse_exporter_comment("iptables-exporter openai traffic=internet-in") == {
        "owner": "openai", "traffic": "internet-in"}
    assert R.parse_exporter_comment("something else") is None
    assert R.parse_shape_comment("fleetkeeper shape ns=a pod=b bucket=3 scope=pod")["bucket"] == "3"
