"""Real kernel objects: namespaces, veth pairs, iptables (both back ends), tc HTB.

Traffic only flows between our own ``fkt-`` namespaces (the "internet" is
203.0.113.2, a documentation address inside one of them); transfers are
bounded in bytes and seconds. Skips, with the reason, without root or ip netns.
"""

import subprocess

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core.domain import Names
from fleetkeeper.netacct import netns as N
from fleetkeeper.netacct.agent import Agent
from fleetkeeper.netacct.iptables import SubprocessRunner
from fleetkeeper.netacct.pods import PodInfo, StaticPodSource
from fleetkeeper.netacct.settings import make_settings

pytestmark = pytest.mark.netns
REASON = N.unavailable_reason()
if REASON:
    pytest.skip(f"netns tests need root and ip netns: {REASON}", allow_module_level=True)

ANN = Names().egress_limit
LIMIT_BPS = 8_000_000


@pytest.fixture(params=N.available_backends() or ["none"])
def node(request):
    if request.param == "none":
        pytest.skip("no iptables back end installed")
    topo = N.Topology.create()
    try:
        yield topo, request.param
    finally:
        topo.destroy()


def pods(limit="8mbit"):
    return [PodInfo("ml", "pod-a", N.POD_A_IP, "vision", {ANN: limit} if limit else {}),
            PodInfo("ml", "pod-b", N.POD_B_IP, "vision", {})]


def agent(topo, backend, pod_list, **kw):
    st = make_settings("test", {"node": "n", "backend": backend, "uplink": N.UPLINK, **kw})
    return Agent(st, StaticPodSource(pod_list), SubprocessRunner(topo.host), registry=CollectorRegistry())


def saved(topo, backend):
    return subprocess.run(["ip", "netns", "exec", topo.host, f"iptables-{backend}-save", "-t", "mangle"],
                          capture_output=True, text=True, check=True).stdout


def rule_lines(topo, backend):
    return [line for line in saved(topo, backend).splitlines() if line.startswith("-A ")]


async def test_counts_match_traffic_sent(node):
    topo, backend = node
    a = agent(topo, backend, pods(limit=None))
    await a.sync_once()
    out = await N.transfer(topo.pod_a, topo.internet, N.INTERNET_IP, nbytes=2_000_000, limit_s=5)
    inn = await N.transfer(topo.internet, topo.pod_b, N.POD_B_IP, nbytes=1_500_000, limit_s=5)
    internal = await N.transfer(topo.pod_a, topo.pod_b, N.POD_B_IP, nbytes=3_000_000, limit_s=5, port=5202)
    assert (out.received, inn.received, internal.received) == (2_000_000, 1_500_000, 3_000_000)
    await a.sync_once()
    t = a.traffic.pod_totals()

    def near(counted, sent):  # IP+TCP headers add a few percent, never less than the payload
        return sent <= counted <= sent * 1.06 + 20_000

    assert near(t[("internet-out", "ml", "pod-a")][1], out.sent)
    assert near(t[("internet-in", "ml", "pod-b")][1], inn.sent)
    assert near(t[("internal-out", "ml", "pod-a")][1], internal.sent)
    assert near(t[("internal-in", "ml", "pod-b")][1], internal.sent)
    # the ACK streams go the other way and are small
    assert t[("internet-in", "ml", "pod-a")][1] < out.sent * 0.1
    assert t[("internet-out", "ml", "pod-b")][1] < inn.sent * 0.1
    reg = a.registry
    ns_out = reg.get_sample_value("fleetkeeper_netacct_namespace_bytes_total",
                                  {"direction": "internet-out", "namespace": "ml"})
    assert ns_out == t[("internet-out", "ml", "pod-a")][1] + t[("internet-out", "ml", "pod-b")][1]
    assert near(reg.get_sample_value("fleetkeeper_netacct_node_bytes_total",
                                     {"direction": "internet-out", "scope": "pods"}), out.sent)


async def test_internet_egress_is_shaped_internal_is_not(node):
    topo, backend = node
    a = agent(topo, backend, pods("8mbit"))
    await a.sync_once()
    shaped = await N.transfer(topo.pod_a, topo.internet, N.INTERNET_IP, nbytes=20_000_000, limit_s=4)
    # an upper bound only: a slower machine can only send less, never more
    wire = shaped.steady_rate_bps() * N.WIRE_OVERHEAD
    assert wire <= 1.1 * LIMIT_BPS, f"shaped to {wire / 1e6:.2f} Mbit/s on the wire"
    # internal traffic and pod-b's internet egress do not go through pod-a's class:
    # proven by the shaper's own byte counters below, not by how fast they ran
    internal = await N.transfer(topo.pod_a, topo.pod_b, N.POD_B_IP, nbytes=5_000_000, limit_s=60, port=5202)
    assert internal.received > 0
    free = await N.transfer(topo.pod_b, topo.internet, N.INTERNET_IP, nbytes=5_000_000, limit_s=60, port=5203)
    assert free.received > 0
    await a.sync_once()
    reg = a.registry
    lab = {"scope": "pod", "namespace": "ml", "pod": "pod-a"}
    assert reg.get_sample_value("fleetkeeper_netacct_shaping_limit_bits_per_second", lab) == LIMIT_BPS
    sent = reg.get_sample_value("fleetkeeper_netacct_shaping_sent_bytes_total", lab)
    assert shaped.sent <= sent <= shaped.sent * 1.1 + 50_000  # only pod-a's internet bytes went through
    assert reg.get_sample_value("fleetkeeper_netacct_shaping_sent_bytes_total",
                                {"scope": "pod", "namespace": "ml", "pod": "pod-b"}) is None  # pod-b: no class
    assert reg.get_sample_value("fleetkeeper_netacct_shaping_overlimits_total", lab) > 0


async def test_restart_leaves_one_copy_and_counters(node):
    topo, backend = node
    await agent(topo, backend, pods()).sync_once()
    await N.transfer(topo.pod_a, topo.internet, N.INTERNET_IP, nbytes=100_000, limit_s=3)
    before = rule_lines(topo, backend)
    counters = subprocess.run(["ip", "netns", "exec", topo.host, f"iptables-{backend}-save", "-c", "-t", "mangle"],
                              capture_output=True, text=True).stdout
    for _ in range(2):
        rep = await agent(topo, backend, pods()).sync_once()
        assert rep.rule_plan.empty, rep.rule_plan.summary()
    after = rule_lines(topo, backend)
    assert after == before and len(after) == len(set(after))
    for hook in ("INPUT", "OUTPUT", "FORWARD"):
        assert sum(line.startswith(f"-A {hook} ") and "FLEETKEEPER" in line for line in after) == 1
    counted = [line for line in counters.splitlines() if "traffic=internet-out ns=ml pod=pod-a" in line]
    assert counted and not counted[0].startswith("[0:0]")
    counters2 = subprocess.run(["ip", "netns", "exec", topo.host, f"iptables-{backend}-save", "-c", "-t", "mangle"],
                               capture_output=True, text=True).stdout
    assert counted[0] in counters2  # unchanged rule kept its counter through the restarts


async def test_removed_pod_loses_its_rules_others_untouched(node):
    topo, backend = node
    x = ["ip", "netns", "exec", topo.host, f"iptables-{backend}"]
    subprocess.run(x + ["-t", "mangle", "-A", "FORWARD", "-s", "10.9.9.9", "-m", "comment", "--comment",
                        "somebody else", "-j", "MARK", "--set-xmark", "0x4000/0x4000"], check=True)
    a = agent(topo, backend, pods())
    await a.sync_once()
    a.source.pods = pods()[1:]
    rep = await a.sync_once()
    text = saved(topo, backend)
    assert "pod=pod-a" not in text and N.POD_A_IP not in text and text.count("pod=pod-b") == 4
    assert "somebody else" in text
    assert not rep.tc_commands or rep.tc_commands == [f"qdisc del dev {N.UPLINK} root"]
    tc = subprocess.run(["ip", "netns", "exec", topo.host, "tc", "qdisc", "show", "dev", N.UPLINK, "root"],
                        capture_output=True, text=True).stdout
    assert "fee7:" not in tc  # last shaped pod gone: the uplink is back to its default qdisc
    done = await a.uninstall()
    assert done
    text = saved(topo, backend)
    assert "FLEETKEEPER" not in text and "somebody else" in text


async def test_malformed_annotation_reported_and_ignored(node, caplog):
    topo, backend = node
    a = agent(topo, backend, pods("8mbit"))
    await a.sync_once()
    a.source.pods = [PodInfo("ml", "pod-a", N.POD_A_IP, "vision", {ANN: "eight megabits"}), pods()[1]]
    with caplog.at_level("WARNING", logger="fleetkeeper.netacct"):
        rep = await a.sync_once()
    assert [p.value for p in rep.problems] == ["eight megabits"]
    assert "eight megabits" in caplog.text and "egress-limit" in caplog.text
    assert a.registry.get_sample_value("fleetkeeper_netacct_invalid_annotations") == 1
    assert rep.rule_plan.empty and not rep.tc_commands  # the working 8mbit limit stays as it was
    shaped = await N.transfer(topo.pod_a, topo.internet, N.INTERNET_IP, nbytes=5_000_000, limit_s=2.5)
    assert shaped.steady_rate_bps() * N.WIRE_OVERHEAD <= 1.1 * LIMIT_BPS
