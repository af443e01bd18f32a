"""The agent against an in-memory iptables/tc that applies restore payloads."""

import shlex

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.errors import Temporary
from fleetkeeper.netacct.agent import Agent
from fleetkeeper.netacct.iptables import CommandResult
from fleetkeeper.netacct.pods import PodInfo
from fleetkeeper.netacct.settings import make_settings

ANN = Names().egress_limit


class FakeKernel:
    """Enough of iptables-restore --noflush and tc -batch to hold state."""

    def __init__(self):
        self.chains = {"PREROUTING": [], "INPUT": [], "FORWARD": [], "OUTPUT": [], "POSTROUTING": []}
        self.chains["FORWARD"].append(['-m comment --comment "someone else" -j ACCEPT', 5, 500])
        self.restores: list[str] = []
        self.tc_batches: list[str] = []
        self.fail_save = False

    def save(self):
        lines = ["*mangle"] + [f":{c} {'ACCEPT' if c.isupper() and '-' not in c else '-'} [0:0]" for c in self.chains]
        for c, rules in self.chains.items():
            lines += [f"[{p}:{b}] -A {c} {spec}" for spec, p, b in rules]
        return "\n".join(lines + ["COMMIT", ""])

    def restore(self, payload):
        self.restores.append(payload)
        for line in payload.splitlines():
            pk = by = 0
            if line.startswith("["):
                cnt, line = line.split(" ", 1)
                pk, by = map(int, cnt[1:-1].split(":"))
            if line.startswith(":"):
                self.chains[line[1:].split()[0]] = []
            elif line.startswith(("-A ", "-D ", "-I ", "-F ", "-X ")):
                op, chain, *rest = line.split(" ", 2)
                spec = rest[0] if rest else ""
                if op == "-A":
                    self.chains[chain].append([spec, pk, by])
                elif op == "-I":
                    self.chains[chain].insert(0, [spec.split(" ", 1)[1], 0, 0])
                elif op == "-D":
                    idx = [shlex.split(s) for s, _, _ in self.chains[chain]].index(shlex.split(spec))
                    del self.chains[chain][idx]
                elif op == "-F":
                    self.chains[chain] = []
                else:
                    del self.chains[chain]

    async def run(self, argv, stdin=None):
        if argv[0].endswith("-save"):
            if self.fail_save:
                return CommandResult(4, "", "xtables lock held")
            return CommandResult(0, self.save(), "")
        if argv[0].endswith("-restore"):
            self.restore(stdin)
            return CommandResult(0, "", "")
        if argv[:2] == ["tc", "-batch"]:
            self.tc_batches.append(stdin)
            return CommandResult(0, "", "")
        if argv[0] == "tc":
            return CommandResult(0, "qdisc noqueue 0: root refcnt 2\n" if "qdisc" in argv else "", "")
        raise AssertionError(argv)


class Source:
    def __init__(self, pods):
        self.pods = pods
        self.fail = False

    async def list(self):
        if self.fail:
            raise Temporary("relay down")
        return list(self.pods)


def make(kernel, source, **kw):
    st = make_settings("t", {"node": "n1", "backend": "nft", **kw})
    return Agent(st, source, kernel, registry=CollectorRegistry(), clock=FakeClock())


PODS = [PodInfo("ml", "a", "10.1.0.2", "vision", {ANN: "8mbit"}), PodInfo("ml", "b", "10.2.0.2", "vision", {})]


def count(kernel, needle):
    return sum(needle in spec for rules in kernel.chains.values() for spec, _, _ in rules)


async def test_restart_adds_nothing_and_foreign_rules_stay():
    k = FakeKernel()
    await make(k, Source(PODS), uplink="eth0").sync_once()
    assert count(k, "pod=a team=") == 4 and count(k, "fleetkeeper shape ns=ml pod=a") == 1
    assert k.chains["FORWARD"][-1] == ['-m comment --comment "someone else" -j ACCEPT', 5, 500]
    for _ in range(2):  # two restarts: fresh agents, same kernel
        rep = await make(k, Source(PODS), uplink="eth0").sync_once()
        assert rep.rule_plan.empty
    assert len(k.restores) == 1 and count(k, "-j FLEETKEEPER-ACCT-FORWARD") == 1
    assert "qdisc replace dev eth0 root handle fee7: htb default 0" in k.tc_batches[0]


async def test_dry_run_changes_nothing():
    k = FakeKernel()
    rep = await make(k, Source(PODS)).sync_once(dry_run=True)
    assert not k.restores and len(rep.rule_plan.appends) > 0
    assert any("add FLEETKEEPER-ACCT-INET-OUT" in line for line in rep.lines())


async def test_pod_source_outage_keeps_rules():
    k = FakeKernel()
    src = Source(PODS)
    agent = make(k, src)
    await agent.sync_once()
    src.fail = True
    rep = await agent.sync_once()
    assert rep.stale_pods and rep.rule_plan.empty and count(k, "pod=b team=") == 4
    first = make(k, src)  # never saw a pod list: changes nothing, reports the error
    with pytest.raises(Temporary):
        await first.sync_once()
    assert len(k.restores) == 1
    assert first.registry.get_sample_value("fleetkeeper_netacct_syncs_total", {"result": "error"}) == 1


async def test_removed_pod_and_malformed_annotation():
    k = FakeKernel()
    src = Source(PODS)
    agent = make(k, src)
    await agent.sync_once()
    src.pods = [PodInfo("ml", "a", "10.1.0.2", "vision", {ANN: "lots"})]
    rep = await agent.sync_once()
    assert count(k, "pod=b team=") == 0 and count(k, "pod=a team=") == 4
    assert [p.value for p in rep.problems] == ["lots"]
    assert agent.registry.get_sample_value("fleetkeeper_netacct_invalid_annotations") == 1


async def test_iptables_failure_is_temporary_and_run_loop_continues():
    k = FakeKernel()
    k.fail_save = True
    clock = FakeClock()
    st = make_settings("t", {"node": "n1", "backend": "nft", "interval_s": 10})
    agent = Agent(st, Source(PODS), k, registry=CollectorRegistry(), clock=clock)
    import asyncio

    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await clock.advance(0)
    k.fail_save = False
    for _ in range(3):
        await clock.advance(10)
    stop.set()
    await asyncio.wait_for(task, 1)
    assert agent.registry.get_sample_value("fleetkeeper_netacct_syncs_total", {"result": "error"}) == 1
    assert agent.registry.get_sample_value("fleetkeeper_netacct_syncs_total", {"result": "ok"}) >= 1
