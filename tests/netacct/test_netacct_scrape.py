"""The scrape path: counters read in one iptables-save call, folded by a
regular-expression pass and rendered from cached series text; the same
samples as the parsed path and as prometheus_client's own exposition."""

from __future__ import annotations

import ipaddress

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetkeeper.netacct import rules as R
from fleetkeeper.netacct.iptables import parse_save
from fleetkeeper.netacct.metrics import ShapedBucket, TrafficCollector
from fleetkeeper.netacct.pods import PodInfo

from test_netacct_agent import PODS, FakeKernel, Source, make

NET8 = (ipaddress.IPv4Network("10.0.0.0/8"),)
FOREIGN = ('[7:700] -A FLEETKEEPER-ACCT-INET-OUT -m comment --comment '
           '"iptables-exporter somebody-else traffic=internet-out ns=ml pod=x"\n'
           '[5:50] -A PREROUTING -m comment --comment "not ours at all" -j ACCEPT\n')


def pods(n: int, offset: int = 0) -> list[PodInfo]:
    return [PodInfo(f"ns-{i % 3}", f"p-{i}", f"10.0.{i // 250}.{i % 250 + 1}", f"team-{i % 2}", {})
            for i in range(offset, offset + n)]


def save_text(ps: list[PodInfo], step: int, duplicate: bool = False) -> str:
    d = R.desired_rules(ps, NET8)
    lines = ["*mangle"] + [f":{c} - [0:0]" for c in R.ALL_CHAINS]
    for chain, rules in d.chains.items():
        for i, r in enumerate(rules):
            lines.append(f"[{i + step}:{(i + step) * 1500}] -A {chain} {r.render()}")
            if duplicate and i == 0:
                lines.append(lines[-1])
    return "\n".join(lines) + "\n" + FOREIGN + "COMMIT\n"


def samples(text: str) -> list:
    return sorted((f.name, f.type, f.documentation, s.name, tuple(sorted(s.labels.items())), s.value)
                  for f in text_string_to_metric_families(text) for s in f.samples)


def test_text_fold_and_render_match_the_parsed_path_and_prometheus_client():
    parsed_reg, text_reg = CollectorRegistry(), CollectorRegistry()
    parsed = TrafficCollector(parsed_reg, max_pod_series=40)
    fast = TrafficCollector(text_reg, max_pod_series=40)
    # growth, pods leaving, pods coming back with reset counters, duplicates, a foreign rule
    steps = [(pods(30), 0, False), (pods(30), 3, False), (pods(25, 5), 4, True), (pods(50), 1, False),
             (pods(50), 9, False)]
    for ps, step, dup in steps:
        text = save_text(ps, step, dup)
        parsed.observe(parse_save(text))
        fast.observe_text(text)
        want = samples(generate_latest(parsed_reg).decode())
        assert samples(generate_latest(text_reg).decode()) == want
        assert samples(fast.render()) == want
    assert fast.pod_totals() == parsed.pod_totals()
    assert any(s[3] == "fleetkeeper_netacct_pod_series_dropped" and s[5] == 10 for s in want)
    fast.observe_shaping({"pod:ml/a": ShapedBucket("pod", "ml", "a", 8_000_000, 1000, 10, 2, 5)})
    assert samples(fast.render()) == samples(generate_latest(text_reg).decode())
    assert "somebody-else" not in fast.render() and 'pod="p-3"' in fast.render()


def test_pod_series_off_renders_no_pod_series():
    tc = TrafficCollector(pod_series=False)
    tc.observe_text(save_text(pods(3), 1))
    assert "fleetkeeper_netacct_pod_bytes_total" not in tc.render()
    assert "fleetkeeper_netacct_namespace_bytes_total" in tc.render()


async def test_a_scrape_reads_the_counters_once_and_serves_them_fresh():
    k = FakeKernel()
    saves: list[list[str]] = []
    run = k.run

    async def counting_run(argv, stdin=None):
        if argv[0].endswith("-save"):
            saves.append(argv)
        return await run(argv, stdin)
    k.run = counting_run
    agent = make(k, Source(PODS))
    await agent.sync_once()
    for rules in k.chains.values():
        for r in rules:
            if "pod=a" in r[0] and "traffic=internet-out" in r[0]:
                r[1], r[2] = r[1] + 10, r[2] + 12_345
    saves.clear()
    body = (await agent.scrape()).decode()
    assert saves == [["iptables-nft-save", "-c", "-t", "mangle"]]
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(body)
           for s in f.samples}
    assert got[("fleetkeeper_netacct_pod_bytes_total",
                (("direction", "internet-out"), ("namespace", "ml"), ("pod", "a"), ("team", "vision")))] == 12_345
    assert got[("fleetkeeper_netacct_syncs_total", (("result", "ok"),))] == 1  # the agent's own metrics too
    # the iptables lock held: the last values are served, nothing lost
    k.fail_save = True
    again = (await agent.scrape()).decode()
    assert samples(again) == samples(body)
