"""The guard in front of a real Prometheus (Debian's) holding a large synthetic series set.

No verdict here depends on how fast this machine is. The deadline is proven
with Prometheus frozen (SIGSTOP): while it cannot answer, the guarded
``{le!=""}`` query still gets a Prometheus ``timeout`` error at the guard's
deadline, and the unguarded one is still waiting; once Prometheus runs again
the unguarded one gets the whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.promguard.policy import GuardPolicy
from fleetkeeper.promguard.proxy import Guard, ProxySettings
from fleetkeeper.promguard.testbed import METRIC, LoadedPrometheus, find_binary, timed_get

pytestmark = [
    pytest.mark.promtool,
    pytest.mark.skipif(find_binary("prometheus") is None,
                       reason="needs the prometheus binary (Debian package 'prometheus', see hack/apt-packages.txt)"),
]

NODES = 250  # 96,000 bucket series
DEADLINE = 1.0


@pytest.fixture(scope="module")
async def loaded():
    async with LoadedPrometheus(NODES) as lp:
        yield lp


async def guarded(lp, registry: CollectorRegistry | None = None, **policy) -> Guard:
    g = Guard(ProxySettings(upstream=lp.url, listen_port=0, policy=GuardPolicy(**policy)), registry)
    await g.start()
    return g


@contextlib.contextmanager
def frozen(lp: LoadedPrometheus):
    """Prometheus stopped (SIGSTOP): the kernel still accepts connections, nothing answers."""
    assert lp.prom is not None and lp.prom.proc is not None
    pid = lp.prom.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def count(reg: CollectorRegistry, outcome: str) -> float:
    return reg.get_sample_value("fleetkeeper_promguard_requests_total",
                                {"endpoint": "series", "outcome": outcome}) or 0.0


async def test_guarded_query_errors_at_deadline_unguarded_waits_for_the_answer(loaded):
    q = [("match[]", '{le!=""}')]
    reg = CollectorRegistry()
    g = await guarded(loaded, reg, deadline=DEADLINE, reject_unscoped=False)  # reads the version first
    try:
        with frozen(loaded):
            unguarded = asyncio.create_task(timed_get(f"{loaded.url}/api/v1/series", q, timeout=600))
            g_dt, g_status, g_body, _ = await timed_get(f"{g.url}/api/v1/series", q, timeout=120)
            # Prometheus cannot have answered: the guard's answer came from its deadline
            assert not unguarded.done()
    finally:
        await g.stop()
    u_dt, u_status, u_body, u_size = await unguarded
    print(f"\nguarded: {g_status} after {g_dt:.2f}s; unguarded: {u_status} after {u_dt:.2f}s "
          f"({u_size / 1e6:.1f} MB, Prometheus frozen for the first part)")

    assert g_status == 503
    assert g_body == {"status": "error", "errorType": "timeout", "error": g_body["error"]}
    assert count(reg, "deadline") == 1 and count(reg, "ok") == 0

    assert u_status == 200 and u_body["status"] == "success"
    assert len(u_body["data"]) == NODES * 8 * 4 * 12


async def test_guarded_query_that_fits_the_deadline_is_answered(loaded):
    """The same guard is no obstacle: a scoped query well inside the deadline is answered."""
    reg = CollectorRegistry()
    g = await guarded(loaded, reg, deadline=120)
    node = "gpu-node-00003.research.cluster.internal"
    try:
        _, status, body, _ = await timed_get(f"{g.url}/api/v1/series", [("match[]", f'{METRIC}_bucket{{node="{node}"}}')])
    finally:
        await g.stop()
    assert status == 200 and len(body["data"]) == 8 * 4 * 12
    assert count(reg, "ok") == 1


async def test_default_policy_refuses_le_query_without_asking_prometheus(loaded):
    reg = CollectorRegistry()
    g = await guarded(loaded, reg)
    try:
        # frozen: a refusal that had to ask Prometheus would end in the deadline's 503, not 400
        with frozen(loaded):
            _, status, body, _ = await timed_get(f"{g.url}/api/v1/series", [("match[]", '{le!=""}')], timeout=600)
    finally:
        await g.stop()
    assert status == 400 and body["errorType"] == "bad_data"
    assert count(reg, "unscoped") == 1


async def test_scoped_queries_still_work_and_are_limited(loaded):
    g = await guarded(loaded, deadline=120, max_series=100, max_label_results=20)
    node = "gpu-node-00003.research.cluster.internal"
    try:
        dt, status, body, _ = await timed_get(f"{g.url}/api/v1/series", [("match[]", f'{METRIC}_count{{node="{node}"}}')])
        assert status == 200 and len(body["data"]) == 8 * 4 and "warnings" not in body
        assert {s["node"] for s in body["data"]} == {node}

        dt, status, body, _ = await timed_get(f"{g.url}/api/v1/series", [("match[]", f'{METRIC}_count{{gpu="0"}}')])
        assert status == 200 and len(body["data"]) == 100
        assert body["warnings"] == ["results truncated due to limit"]

        dt, status, body, _ = await timed_get(f"{g.url}/api/v1/label/node/values", [])
        assert status == 200 and len(body["data"]) == 20 and body["warnings"]

        dt, status, body, _ = await timed_get(f"{g.url}/api/v1/labels", [("match[]", f"{METRIC}_sum")])
        assert status == 200 and {"node", "gpu", "uuid", "op", "rack"} <= set(body["data"])

        # A PromQL query is proxied untouched (the target went quiet after one scrape, hence _over_time).
        dt, status, body, _ = await timed_get(f"{g.url}/api/v1/query", [("query", f"count(count_over_time({METRIC}_count[10m]))")])
        assert status == 200 and body["data"]["result"][0]["value"][1] == str(NODES * 8 * 4)
    finally:
        await g.stop()
