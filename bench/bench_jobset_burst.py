"""A 1,000-pod JobSet burst through the real JobSet controller, with and
without the teams webhook, on a local control plane of its own (temp dir).

    .venv/bin/python bench/bench_jobset_burst.py [--pods 1000] [--rounds 2] [--jobs 10]

alice (team-a) submits one JobSet of ``--jobs`` Jobs x ``pods/jobs`` parallelism;
the time is from the JobSet's CREATE until every pod exists (admitted and
stored; the pods name a scheduler that does not exist, so scheduling is not
measured). Rounds alternate with / without the webhook registered, each in a
fresh namespace, and the medians are compared. Also printed: how many
admission requests the webhook served in the "with" rounds (the Jobs' pods
are created by kube-system's Job controller, which skips the webhook through
matchConditions; the JobSet and its Jobs are admitted, the Jobs attributed to
alice through the owner index).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from common import local_cluster
from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import build_request, CONFIGMAPS, MUTATING_WEBHOOKS, NAMESPACES, PODS, VALIDATING_WEBHOOKS, Kube, Resource
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster import operators as ops
from fleetkeeper.teams.controller import setup
from fleetkeeper.teams.serve import unregister

NAMES = Names()
JOBSETS = Resource("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet", True)
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True)
LABEL = {"bench": "jobset-burst"}
# the local kube-controller-manager runs as cluster-admin (system:masters); in a real cluster its
# controllers are kube-system service accounts, which the webhook's matchConditions skip
SKIP_MASTERS = ("!request.userInfo.groups.exists(g, g in ['system:serviceaccounts:kube-system', 'system:nodes', "
                "'system:masters'])")
CONFIG = ("teams:\n  - {team: team-a, nodeSelector: {}, count: 0}\nmembership:\n  team-a: {groups: [team-a]}\n"
          "lowPriority: {below: 0}\n")


def jobset(name: str, jobs: int, per_job: int) -> dict:
    tmpl = {"metadata": {"labels": {"app": name}},
            "spec": {"schedulerName": "bench-nobody", "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "c", "image": "trainer:latest"}]}}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": name},
            "spec": {"replicatedJobs": [{"name": "w", "replicas": jobs, "template": {"spec": {
                "parallelism": per_job, "completions": per_job, "backoffLimit": 0, "template": tmpl}}}]}}


async def namespace(kube: Kube, name: str) -> None:
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": LABEL}})
    await kube.create(ROLEBINDINGS, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "researchers-edit", "namespace": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "researchers"}]}, name)


async def count_pods(kube: Kube, ns: str) -> int:
    """How many pods exist, from a one-item list (its remainingItemCount): polling
    must not load the event loop that serves the webhook being measured."""
    body = await kube.request(build_request("list", PODS, namespace=ns, limit=1))
    items = body.get("items") or []
    return len(items) + int((body.get("metadata") or {}).get("remainingItemCount") or 0)


async def burst(kube: Kube, alice: Kube, ns: str, jobs: int, pods: int, timeout: float = 900) -> float:
    await namespace(kube, ns)
    for _ in range(100):  # the RoleBinding reaches the authorizer's cache
        try:
            await alice.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}}, ns)
            break
        except errors.Forbidden:
            await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    await alice.create(JOBSETS, jobset("js", jobs, pods // jobs), ns)
    deadline = t0 + timeout
    have = 0
    while time.perf_counter() < deadline:
        have = await count_pods(kube, ns)
        if have >= pods:
            dt = time.perf_counter() - t0
            break
        await asyncio.sleep(0.25)
    else:
        raise RuntimeError(f"{ns}: only {have} of {pods} pods after {timeout}s")
    await kube.delete(NAMESPACES, ns)
    return dt


def requests(reg: CollectorRegistry) -> float:
    return sum(reg.get_sample_value("fleetkeeper_webhook_requests_total", {"webhook": w, "result": x}) or 0
               for w in ("teams-mutate", "teams-validate") for x in ("allowed", "patched", "denied", "error"))


async def main(pods: int, rounds: int, jobs: int, variants: list[str]) -> None:
    dirs = ops.build("jobset-controller")
    async with local_cluster(4, "fk-bench-jobset-") as lc:
        kube = await lc.connect()
        work = Path(tempfile.mkdtemp(prefix="fk-bench-operators-"))
        o = ops.Operators(lc, kube, work, namespace_labels=LABEL)
        try:
            await o.install_crds(dirs)
            await o.start_jobset(dirs["jobset-controller"])
            await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                           "metadata": {"name": "fleetkeeper-system"}})
            await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": "fleetkeeper-teams", "namespace": "fleetkeeper-system"},
                                           "data": {"config.yaml": CONFIG}}, "fleetkeeper-system")
            reg = CollectorRegistry()
            mgr = Manager(kube, RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}), registry=reg)
            await setup(mgr, {"webhook": {"configName": "bench-jobset", "namespaceLabels": LABEL}})
            task = asyncio.create_task(mgr.run())
            await mgr.teams_webhook.ready.wait()
            await asyncio.sleep(2)
            mut, val = mgr.teams_webhook.objects()
            alice = await Kube.connect(str(lc.user_kubeconfig("alice")))
            res: dict[str, list[float]] = {v: [] for v in variants}
            warm = await burst(kube, alice, "bench-warmup", jobs, pods)  # JobSet/Job controllers' caches warm
            print(f"warm-up (with the webhook, not counted): {warm:.1f}s", flush=True)
            skip_mut, skip_val = copy.deepcopy(mut), copy.deepcopy(val)
            for obj in (skip_mut, skip_val):
                for wh in obj["webhooks"]:
                    wh["matchConditions"] = [{"name": "not-from-skipped-groups", "expression": SKIP_MASTERS}]
            served: dict[str, float] = {v: 0.0 for v in variants}
            for r in range(rounds):
                for v in variants:
                    await unregister(kube, "bench-jobset")
                    if v != "without":
                        await kube.apply(MUTATING_WEBHOOKS, mut if v == "with" else skip_mut)
                        await kube.apply(VALIDATING_WEBHOOKS, val if v == "with" else skip_val)
                    await asyncio.sleep(2)
                    before = requests(reg)
                    res[v].append(await burst(kube, alice, f"bench-{v}-{r}", jobs, pods))
                    served[v] += requests(reg) - before
                print(f"round {r}: " + ", ".join(f"{v} {res[v][-1]:.1f}s" for v in variants), flush=True)
            wo = statistics.median(res["without"]) if res.get("without") else None
            for v in variants:
                m = statistics.median(res[v])
                ratio = f" = {m / wo:.2f}x without" if wo else ""
                print(f"{pods}-pod JobSet ({jobs} Jobs x {pods // jobs}), {v}: {m:.1f}s{ratio}; runs {res[v]}; "
                      f"webhook requests per burst {served[v] / rounds:.0f} (mutate + validate)")
            await alice.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await o.stop()
            await kube.close()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--variants", default="with,with-skip,without",
                    help="with: every request judged; with-skip: the built-in controllers skip the webhook, as in "
                         "a real cluster (here they run as cluster-admin); without: no webhook")
    a = ap.parse_args()
    asyncio.run(main(a.pods, a.rounds, a.jobs, a.variants.split(",")))
