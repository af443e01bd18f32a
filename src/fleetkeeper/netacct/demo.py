"""``make demo``: a short accounting and shaping run in network namespaces."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from fleetkeeper.core.outcome import Outcome
from fleetkeeper.netacct import netns as N
from fleetkeeper.netacct.agent import Agent
from fleetkeeper.netacct.iptables import SubprocessRunner
from fleetkeeper.netacct.pods import PodInfo, StaticPodSource
from fleetkeeper.netacct.settings import make_settings

LIMIT = "8mbit"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


async def demo(report: Callable[[str], None] | Any) -> Outcome:
    say = report.report if hasattr(report, "report") else report
    why = await asyncio.to_thread(N.unavailable_reason)
    if why:
        say(f"netacct: skipped: {why}")
        return Outcome.skip(why)
    outcome = Outcome()
    backend = N.available_backends()[0]
    topo = await asyncio.to_thread(N.Topology.create)
    try:
        st = make_settings("demo", {"node": "demo", "backend": backend, "uplink": N.UPLINK})
        pods = [PodInfo("ml", "trainer-0", N.POD_A_IP, "vision", {"fleetkeeper.io/egress-limit": LIMIT}),
                PodInfo("ml", "trainer-1", N.POD_B_IP, "vision", {})]
        agent = Agent(st, StaticPodSource(pods), SubprocessRunner(topo.host), registry=CollectorRegistry())
        rep = await agent.sync_once()
        say(f"netacct: {rep.rule_plan.kept + len(rep.rule_plan.appends) if rep.rule_plan else 0} rules "
            f"installed ({backend} back end) for {len(pods)} pods; ml/trainer-0 limited to {LIMIT} "
            f"toward the internet")
        inet = await N.transfer(topo.pod_a, topo.internet, N.INTERNET_IP, nbytes=4_000_000, limit_s=3)
        internal = await N.transfer(topo.pod_a, topo.pod_b, N.POD_B_IP, nbytes=200_000_000, limit_s=2)
        down = await N.transfer(topo.internet, topo.pod_b, N.POD_B_IP, nbytes=1_000_000, limit_s=2)
        again = await agent.sync_once()
        c = agent.traffic
        pod = {(d, p): b for (d, _ns, p), (_pk, b) in c.pod_totals().items()}
        for what, sent, key in (("internet-out", inet.sent, ("internet-out", "trainer-0")),
                                ("internet-in", down.received, ("internet-in", "trainer-1")),
                                ("internal-out", internal.sent, ("internal-out", "trainer-0"))):
            outcome.expect(sent <= pod.get(key, 0) <= sent * 1.1 + 100_000, f"{what} bytes counted (IP headers added)",
                           f"{_mb(sent)} sent, {_mb(pod.get(key, 0))} counted")
        say(f"netacct: trainer-0 sent {_mb(inet.sent)} to the internet; counted internet-out "
            f"{_mb(pod.get(('internet-out', 'trainer-0'), 0))} (IP headers included)")
        say(f"netacct: trainer-1 received {_mb(down.received)} from the internet; counted internet-in "
            f"{_mb(pod.get(('internet-in', 'trainer-1'), 0))}")
        say(f"netacct: trainer-0 -> trainer-1 {_mb(internal.sent)} internal; counted internal-out "
            f"{_mb(pod.get(('internal-out', 'trainer-0'), 0))}")
        shaped = inet.steady_rate_bps()
        outcome.expect(shaped * N.WIRE_OVERHEAD <= 1.1 * 8e6, f"internet egress held to {LIMIT}",
                       f"{shaped * N.WIRE_OVERHEAD / 1e6:.2f} Mbit/s")
        outcome.expect(not again.rule_plan or again.rule_plan.empty, "a second sync changes nothing")
        say(f"netacct: shaped internet egress {shaped / 1e6:.2f} Mbit/s payload vs limit {LIMIT} "
            f"(~{shaped * N.WIRE_OVERHEAD / 1e6:.2f} Mbit/s on the wire)")
        say(f"netacct: unshaped internal traffic {internal.sent * 8 / internal.seconds / 1e6:.0f} Mbit/s "
            f"(same pod, not slowed)")
        say(f"netacct: second sync changed {len(again.rule_plan.summary()) if again.rule_plan else 0} rules "
            "(idempotent)")
    finally:
        await asyncio.to_thread(topo.destroy)
    return outcome
