"""The guard in front of a real Prometheus (Debian's) holding a large synthetic series set.

The unguarded ``{le!=""}`` query and the guarded one are timed side by side:
the guarded one answers a Prometheus ``timeout`` error within its deadline,
the unguarded one takes several times longer.
"""

from __future__ import annotations

import pytest

from fleetkeeper.promguard.policy import GuardPolicy
from fleetkeeper.promguard.proxy import Guard, ProxySettings
from fleetkeeper.promguard.testbed import METRIC, LoadedPrometheus, find_binary, timed_get

pytestmark = [
    pytest.mark.promtool,
    pytest.mark.skipif(find_binary("prometheus") is None,
                       reason="needs the prometheus binary (Debian package 'prometheus', see hack/apt-packages.txt)"),
]

NODES = 250  # 96,000 bucket series; the unguarded {le!=""} takes ~3-5 s on 2 cores
DEADLINE = 1.0


@pytest.fixture(scope="module")
async def loaded():
    async with LoadedPrometheus(NODES) as lp:
        yield lp


async def guarded(lp, **policy) -> Guard:
    g = Guard(ProxySettings(upstream=lp.url, listen_port=0, policy=GuardPolicy(**policy)))
    await g.start()
    return g


async def test_guarded_query_errors_within_deadline_unguarded_does_not(loaded):
    q = [("match[]", '{le!=""}')]
    g = await guarded(loaded, deadline=DEADLINE, reject_unscoped=False)
    try:
        g_dt, g_status, g_body, _ = await timed_get(f"{g.url}/api/v1/series", q)
    finally:
        await g.stop()
    u_dt, u_status, u_body, u_size = await timed_get(f"{loaded.url}/api/v1/series", q)
    print(f"\nunguarded: {u_status} in {u_dt:.2f}s ({u_size / 1e6:.1f} MB); guarded: {g_status} in {g_dt:.2f}s")

    assert g_status == 503
    assert g_body == {"status": "error", "errorType": "timeout", "error": g_body["error"]}
    assert DEADLINE * 0.9 <= g_dt < DEADLINE + 0.5

    assert u_status == 200 and u_body["status"] == "success"
    assert len(u_body["data"]) == NODES * 8 * 4 * 12
    assert u_dt > DEADLINE * 1.5, "the synthetic set is too small to show the deadline"


async def test_default_policy_refuses_le_query_at_once(loaded):
    g = await guarded(loaded)
    try:
        dt, status, body, _ = await timed_get(f"{g.url}/api/v1/series", [("match[]", '{le!=""}')])
    finally:
        await g.stop()
    assert status == 400 and body["errorType"] == "bad_data" and dt < 0.5


async def test_scoped_queries_still_work_and_are_limited(loaded):
    g = await guarded(loaded, deadline=5, max_series=100, max_label_results=20)
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
