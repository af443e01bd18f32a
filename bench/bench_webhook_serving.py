"""Admission webhook serving cost, without a cluster: the teams webhook's
WebhookServer (TLS, HTTP/1.1 keep-alive) answering AdmissionReviews sent by a
client in another process, 32 at a time, as kube-apiserver does in a burst.

    .venv/bin/python bench/bench_webhook_serving.py [--requests 4000]

Prints the server process's CPU time per request (the figure that competes
with kube-apiserver for the machine) and handler latency percentiles, next to
the decision alone (mutate + validate in process, no transport) measured in the
same run. Never passes or fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

from fleetkeeper.core.domain import Names
from fleetkeeper.core.pki import write_serving_cert
from fleetkeeper.core.webhook import AdmissionRequest, WebhookServer
from fleetkeeper.teams.admission import Priorities, TeamAdmission
from fleetkeeper.teams.config import ConfigState, TeamsConfig

NAMES = Names()


def review(i: int) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": f"u-{i}", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "operation": "CREATE", "namespace": "ns", "name": f"p-{i}",
                        "userInfo": {"username": "alice", "groups": ["g7", "researchers", "system:authenticated"]},
                        "object": {"apiVersion": "v1", "kind": "Pod",
                                   "metadata": {"name": f"p-{i}", "namespace": "ns", "labels": {"app": "x"},
                                                "managedFields": [{"manager": "bench", "operation": "Update",
                                                                   "apiVersion": "v1", "fieldsType": "FieldsV1",
                                                                   "fieldsV1": {"f:spec": {"f:containers": {}}}}]},
                                   "spec": {"containers": [{"name": "c", "image": "i", "resources": {},
                                                            "terminationMessagePath": "/dev/termination-log",
                                                            "imagePullPolicy": "Always"}],
                                            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
                                            "schedulerName": "default-scheduler", "priority": 0,
                                            "tolerations": [
                                                {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                                 "effect": "NoExecute", "tolerationSeconds": 300}]},
                                   "status": {}},
                        "dryRun": False}}


def admission() -> TeamAdmission:
    st = ConfigState()
    st.accept(TeamsConfig.model_validate({
        "teams": [{"team": f"team-{k:02d}", "nodeSelector": {}, "count": 1} for k in range(40)],
        "membership": {f"team-{k:02d}": {"groups": [f"g{k}"]} for k in range(40)}}), "1")
    return TeamAdmission(NAMES, st, lambda: Priorities({"low": -10}, 0))


CLIENT = """
import asyncio, ssl, sys, time, orjson, aiohttp
url, ca, n, conc, body_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
bodies = orjson.loads(open(body_file, "rb").read())
async def main():
    ctx = ssl.create_default_context(cafile=ca)
    conn = aiohttp.TCPConnector(ssl=ctx, limit=conc)
    async with aiohttp.ClientSession(connector=conn) as s:
        sem = asyncio.Semaphore(conc)
        async def one(i):
            async with sem:
                for path in ("teams-mutate", "teams-validate"):
                    async with s.post(f"{url}/{path}", data=bodies[i % len(bodies)],
                                      headers={"Content-Type": "application/json"}) as r:
                        assert r.status == 200, r.status
                        await r.read()
        await asyncio.gather(*(one(i) for i in range(64)))  # warm the connections
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        print(time.perf_counter() - t0)
asyncio.run(main())
"""


async def serve_and_load(requests: int, conc: int) -> None:
    d = Path(tempfile.mkdtemp(prefix="fk-bench-wh-"))
    sc = write_serving_cert(d, ["127.0.0.1"])
    (d / "ca.pem").write_bytes(sc.ca_bundle)
    bodies = [orjson.dumps(review(i)).decode() for i in range(50)]
    (d / "bodies.json").write_bytes(orjson.dumps(bodies))
    adm = admission()
    reg = CollectorRegistry()
    server = WebhookServer(str(sc.cert), str(sc.key), registry=reg)
    server.add("teams-mutate", adm.mutate)
    server.add("teams-validate", adm.validate)
    times: list[float] = []
    for name in ("teams-mutate", "teams-validate"):
        child = server.metrics.latency.labels(name)
        observe = child.observe

        def rec(v: float, observe=observe) -> None:
            times.append(v)
            observe(v)
        child.observe = rec
    await server.start()
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, f"https://127.0.0.1:{server.port}", str(d / "ca.pem"), str(requests),
            str(conc), str(d / "bodies.json"), stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        await server.stop()
    n = len(times) - 128  # the warm-up calls
    times = sorted(times[128:])
    print(f"served {n} webhook calls ({requests} pods x mutate+validate, {conc} concurrent) in "
          f"{float(out.decode().split()[-1]):.2f}s: server CPU {cpu / (n + 128) * 1e3:.3f} ms per call; "
          f"handler p50 {times[n // 2] * 1e3:.3f} ms, p99 {times[int(n * 0.99)] * 1e3:.3f} ms")


def decision_only(n: int = 4000) -> None:
    adm = admission()
    raw = [orjson.dumps(review(i)) for i in range(50)]
    c0 = time.process_time()
    for i in range(n):
        r = AdmissionRequest.from_review(orjson.loads(raw[i % 50]))
        orjson.dumps(adm.mutate(r).response(r.uid))
        r = AdmissionRequest.from_review(orjson.loads(raw[i % 50]))
        orjson.dumps(adm.validate(r).response(r.uid))
    print(f"baseline: decision alone (parse + decide + encode, no transport): "
          f"{(time.process_time() - c0) / (2 * n) * 1e3:.3f} ms CPU per call")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    a = ap.parse_args()
    print(f"== webhook serving, load average {os.getloadavg()[0]:.1f}")
    decision_only()
    asyncio.run(serve_and_load(a.requests, a.concurrency))


if __name__ == "__main__":
    main()
