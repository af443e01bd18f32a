"""Shared by the benchmarks: a throw-away local cluster, and kube-apiserver's /metrics
(scrape, deltas and histogram quantiles between two scrapes)."""

from __future__ import annotations

import contextlib
import ssl
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from fleetkeeper.localcluster.cluster import LocalCluster


@contextlib.asynccontextmanager
async def local_cluster(nodes: int, prefix: str) -> AsyncIterator[LocalCluster]:
    """A control plane with ``nodes`` simulated 8-GPU nodes in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        lc = LocalCluster(Path(tmp))
        try:
            t = time.monotonic()
            await lc.up(nodes, 8, progress=lambda m: None)
            print(f"cluster: {nodes} nodes up in {time.monotonic() - t:.0f}s", flush=True)
            yield lc
        finally:
            lc.down(purge=True)

def cpu_seconds(lc: LocalCluster, only: tuple[str, ...] | None = None) -> dict[str, float]:
    """CPU seconds so far of each local control-plane process (KWOK included; ``only``: just these) and of
    this one (fleetkeeper's controllers and the benchmark), from the kernel's own accounting."""
    import resource

    from fleetkeeper.cli.demo import proc_usage
    out = {comp: proc_usage(pid)[1] or 0.0 for comp, pid in sorted(lc.state.pids.items())
           if only is None or comp in only}
    me = resource.getrusage(resource.RUSAGE_SELF)
    out["fleetkeeper"] = me.ru_utime + me.ru_stime
    return out


WRITE_VERBS = ('verb="POST"', 'verb="PATCH"', 'verb="PUT"', 'verb="DELETE"')


def _ctx(lc: LocalCluster) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(lc.dir / "pki" / "ca.crt"))


def parse_metrics(text: str, prefix: str = "") -> dict[str, float]:
    """Prometheus text exposition -> {series: value}, only series starting with ``prefix``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and line.startswith(prefix):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


async def scrape(lc: LocalCluster) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{lc.server}/metrics", ssl=_ctx(lc),
                                                    headers={"Authorization": f"Bearer {lc.state.token}"}) as r:
        return parse_metrics(await r.text())


async def scheduler_metrics(lc: LocalCluster, prefix: str = "scheduler_") -> dict[str, float] | str:
    """kube-scheduler's own /metrics (series starting with ``prefix``), or why they are unavailable
    (a diagnostic only)."""
    url = f"https://127.0.0.1:{lc.state.ports.scheduler}/metrics"
    try:
        async with aiohttp.ClientSession() as s, s.get(url, ssl=False,
                                                        headers={"Authorization": f"Bearer {lc.state.token}"}) as r:
            text = await r.text()
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return f"(scheduler metrics unavailable: {exc})"
    return parse_metrics(text, prefix)


async def scheduler_queues(lc: LocalCluster) -> dict[str, int] | str:
    """kube-scheduler's pending pods per queue (scheduler_pending_pods), or why it is unavailable
    (a diagnostic only)."""
    got = await scheduler_metrics(lc, "scheduler_pending_pods{")
    if isinstance(got, str):
        return got
    return {k.split('queue="', 1)[1].split('"', 1)[0]: int(v) for k, v in got.items()}


def scheduler_work(a: dict[str, float] | str, b: dict[str, float] | str) -> str:
    """What kube-scheduler did between two :func:`scheduler_metrics` scrapes: scheduling attempts and
    their seconds by result, and preemption attempts (where a burst's scheduling time goes)."""
    if isinstance(a, str) or isinstance(b, str):
        return a if isinstance(a, str) else str(b)
    out = []
    for result in ("scheduled", "unschedulable", "error"):
        n = delta(a, b, "scheduler_scheduling_attempt_duration_seconds_count", f'result="{result}"')
        s = delta(a, b, "scheduler_scheduling_attempt_duration_seconds_sum", f'result="{result}"')
        if n:
            out.append(f"{int(n)} {result} attempts, {s:.1f}s ({1000 * s / n:.0f} ms each)")
    pre = delta(a, b, "scheduler_preemption_attempts_total")
    out.append(f"{int(pre)} preemption attempts")
    return "; ".join(out)


# per-plugin samples and queueing hints: too many series to print; the extension points sum them
SCHEDULER_SKIP = ("scheduler_plugin_execution_duration_seconds", "scheduler_queueing_hint_execution_duration_seconds")


def scheduler_delta(a: dict[str, float] | str, b: dict[str, float] | str) -> str:
    """kube-scheduler's own metrics between two scrapes: attempts by result, and for every duration histogram
    with observations in between, count, sum and the mean (s)."""
    if isinstance(a, str) or isinstance(b, str):  # unavailable (see scheduler_metrics)
        return a if isinstance(a, str) else str(b)
    attempts = {k.split('result="', 1)[1].split('"', 1)[0]: b[k] - a.get(k, 0.0) for k in b
                if k.startswith("scheduler_schedule_attempts_total{") and b[k] - a.get(k, 0.0)}
    parts = [f"attempts {attempts}"]
    for k in sorted(b):
        if not k.endswith("_count") and "_count{" not in k:
            continue
        n = b[k] - a.get(k, 0.0)
        if n <= 0 or not k.startswith("scheduler_") or k.startswith(SCHEDULER_SKIP):
            continue
        ks = k.replace("_count", "_sum", 1)
        s = b.get(ks, 0.0) - a.get(ks, 0.0)
        if s < 0.05 and "attempt" not in k:
            continue
        parts.append(f"{k.replace('_count', '', 1)} n={n:.0f} sum={s:.1f}s mean={s / n:.3f}s")
    return "\n           ".join(parts)


def total(m: dict[str, float], name: str, *must: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(name + "{") or k == name
               if all(x in k for x in must))


def delta(a: dict, b: dict, name: str, *must: str) -> float:
    return total(b, name, *must) - total(a, name, *must)


def quantile_from_buckets(a: dict, b: dict, name: str, q: float, *must: str) -> float:
    """q-quantile of a histogram's observations between two scrapes (upper bucket bound)."""
    buckets: dict[float, float] = defaultdict(float)
    for k, v in b.items():
        if k.startswith(name + "_bucket{") and all(x in k for x in must):
            le = k.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] += v - a.get(k, 0.0)
    if not buckets:
        return float("nan")
    les = sorted(buckets)
    n = buckets[les[-1]]
    if n <= 0:
        return float("nan")
    for le in les:
        if buckets[le] >= q * n:
            return le
    return les[-1]


def writes(a: dict, b: dict, *must: str) -> float:
    """Mutating requests the API server served between two scrapes (every client)."""
    return sum(delta(a, b, "apiserver_request_total", v, *must) for v in WRITE_VERBS)


def own_writes(reg: CollectorRegistry) -> dict[str, float]:
    """Mutating requests fleetkeeper itself sent (its ``fleetkeeper_api_requests_total``), by resource."""
    out: dict[str, float] = {}
    for m in reg.collect():
        if m.name == "fleetkeeper_api_requests":
            for s in m.samples:
                if s.name.endswith("_total") and s.labels.get("verb") in ("create", "patch", "update", "delete"):
                    k = s.labels.get("resource", "?")
                    out[k] = out.get(k, 0.0) + s.value
    return out


def api_requests(a: dict, b: dict, top: int = 15) -> str:
    """The API server's requests between two scrapes (every client), by verb, resource and subresource,
    the largest first: what a mode asked of kube-apiserver."""
    out: dict[str, float] = defaultdict(float)
    for k, v in b.items():
        if not k.startswith("apiserver_request_total{"):
            continue
        labels = dict(x.split("=", 1) for x in k[len("apiserver_request_total{"):-1].split(",") if "=" in x)
        if labels.get("verb", '""').strip('"') in ("WATCH", "CONNECT"):
            continue
        key = "/".join(x for x in (labels.get("verb", "").strip('"'), labels.get("resource", "").strip('"'),
                                   labels.get("subresource", "").strip('"')) if x)
        out[key] += v - a.get(k, 0.0)
    rows = sorted(((n, k) for k, n in out.items() if n > 0), reverse=True)
    return f"{sum(n for n, _ in rows):.0f} requests: " + ", ".join(f"{k} {n:.0f}" for n, k in rows[:top])
