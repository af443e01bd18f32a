"""fleetkeeper at full scale on one local control plane: manager memory with
every component, the relay with one agent per node, team convergence.

    .venv/bin/python bench/bench_scale.py [--nodes 7500] [--pods 20000] [--agents 7500]
                                          [--parts rss,relay,teams] [--teams 40]

rss     the controller manager as its own process, once with no controller,
        once with each controller alone and once with every controller (all
        at once), against the cluster holding ``--pods`` pods bound to its
        nodes; RSS (VmRSS, and VmHWM, the peak) 10 s after its informers
        synced. The breakdown per component is "alone" minus "no controller".
        ``bench_scale.py --rss-only KUBECONFIG`` runs only this part against
        a cluster that is already up.
relay   ``fleetkeeper relay serve`` as its own process and ``--agents``
        agents (one per node, each following its node) in this process;
        API-server WATCH requests by resource before and after; relay RSS;
        pod create -> the node's agent has it, for a sample of pods created
        while every agent is connected.
teams   the teams controller converging ``--teams`` teams from scratch vs a
        bare loop of the same patches (bench/bench_teams.py's), then 3 forced
        reconciles at steady state (writes must be 0).

Prints figures next to baselines from the same run; never passes or fails on
time. The control plane is started in a temporary directory and stopped
afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from fleetkeeper.core import errors
from fleetkeeper.core.kube import CONFIGMAPS, NAMESPACES, NODES, PODS, Kube
from fleetkeeper.localcluster.cluster import LocalCluster, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_relay import RelayAgent, say  # noqa: E402  bench/ helpers
from common import scrape, total  # noqa: E402

FK = str(Path(sys.executable).parent / "fleetkeeper")
SYSTEM_NS = "fleetkeeper-system"
CONTROLLERS = ("preflight", "health", "lifecycle", "capacity", "relay", "teams")


def mem(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out.get("VmRSS", 0.0), out.get("VmHWM", 0.0)


async def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def make_pods(kube: Kube, nodes: list[str], n: int, ns: str, concurrency: int = 64) -> float:
    try:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    except errors.Conflict:
        pass
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"w-{i:05d}", "labels": {"app": "scale", "fleetkeeper.io/team": f"team-{i % 40:02d}"}},
                "spec": {"nodeName": nodes[i % len(nodes)], "tolerations": [{"operator": "Exists"}],
                         "terminationGracePeriodSeconds": 0,
                         "containers": [{"name": "c", "image": "trainer", "resources": {"requests": {"cpu": "100m"}}}]}}
        async with sem:
            for attempt in range(5):
                try:
                    await kube.create(PODS, body, ns)
                    return
                except errors.Conflict:
                    return
                except errors.FleetkeeperError:
                    await asyncio.sleep(1 + attempt)

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.monotonic() - t0


# --- rss ----------------------------------------------------------------------------------
async def rss_part(lc: LocalCluster, kube: Kube, teams: int) -> None:
    from bench_teams import config_text, initial_counts

    nodes, _ = await kube.list(NODES)
    gpu = sum(1 for n in nodes if (n["metadata"].get("labels") or {}).get("fleetkeeper.io/pool") == "gpu")
    try:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}})
    except errors.Conflict:
        pass
    # every component with a realistic configuration: 40 teams; the teams webhook
    # served but not registered; the relay on a free port
    await kube.apply(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "fleetkeeper-teams", "namespace": SYSTEM_NS},
                                  "data": {"config.yaml": config_text(initial_counts(gpu, teams)),
                                           "options.yaml": "webhook: {register: false}\n"}})
    await kube.apply(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "fleetkeeper-relay", "namespace": SYSTEM_NS},
                                  "data": {"config.yaml": "relay: {port: 0}\n"}})
    print(f"manager RSS at {len(nodes)} nodes, each run its own process (manager, informers, controllers):")
    await rss_children(str(lc.kubeconfig), [("no controller (manager only)", "")] + [(c, c) for c in CONTROLLERS]
                       + [("every controller", ",".join(CONTROLLERS))])


# --- relay --------------------------------------------------------------------------------
def watches(m: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in m.items():
        if k.startswith("apiserver_longrunning_requests{") and 'verb="WATCH"' in k and 'subresource=""' in k:
            res = k.split('resource="', 1)[1].split('"', 1)[0]
            out[res] = out.get(res, 0) + v
    return out


async def relay_part(lc: LocalCluster, kube: Kube, agents_n: int, sample: int) -> None:
    nodes = sorted(n["metadata"]["name"] for n in (await kube.list(NODES, label_selector="type=kwok"))[0])[:agents_n]
    port, mport = free_port(), free_port()
    m0 = await scrape(lc)
    proc = subprocess.Popen([FK, "relay", "serve", "--listen", f"127.0.0.1:{port}", "--metrics-port", str(mport),
                             "--kubeconfig", str(lc.kubeconfig), "--namespace", SYSTEM_NS, "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None))
    tasks: list[asyncio.Task] = []
    try:
        ready = await wait_http(f"http://127.0.0.1:{mport}/readyz", 900, proc)
        say(f"  relay: synced in {ready:.0f}s, RSS {mem(proc.pid)[0]:.0f} MB; connecting {len(nodes)} agents")
        url = f"http://127.0.0.1:{port}"
        agents = {n: RelayAgent(url, n, session) for n in nodes}
        first = {n: asyncio.Event() for n in nodes}

        async def follow(n: str, a: RelayAgent) -> None:
            async for st in a.client.sync():
                a.pods = st.pods
                first[n].set()
        t0 = time.monotonic()
        tasks = [asyncio.create_task(follow(n, a)) for n, a in agents.items()]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first.values())), 900)
        connect_s = time.monotonic() - t0
        await asyncio.sleep(3)
        m1 = await scrape(lc)
        r_conn, _ = mem(proc.pid)
        say(f"  relay: {len(nodes)} agents have their first view after {connect_s:.0f}s; relay RSS {r_conn:.0f} MB")
        # fan-out: pods created one at a time (20/s) on random nodes; when does that node's agent have it?
        ns = "scale-relay"
        try:
            await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        except errors.Conflict:
            pass
        created: dict[str, tuple[str, float]] = {}
        seen: dict[str, float] = {}
        done = asyncio.Event()

        async def check() -> None:
            while not done.is_set():
                now = time.monotonic()
                for key, (node, _) in list(created.items()):
                    if key not in seen and key in agents[node].pods:
                        seen[key] = now
                await asyncio.sleep(0.01)
        checker = asyncio.create_task(check())
        rng = random.Random(7)
        for i in range(sample):
            node = rng.choice(nodes)
            key = f"{ns}/f-{i:04d}"
            created[key] = (node, time.monotonic())
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"f-{i:04d}"},
                                     "spec": {"nodeName": node, "tolerations": [{"operator": "Exists"}],
                                              "containers": [{"name": "c", "image": "i"}]}}, ns)
            await asyncio.sleep(0.05)
        t_end = time.monotonic() + 120
        while len(seen) < len(created) and time.monotonic() < t_end:
            await asyncio.sleep(0.1)
        done.set()
        await checker
        lat = sorted(seen[k] - created[k][1] for k in seen)
        foreign = sum(1 for n, a in agents.items() for k in a.pods
                      if k.startswith(ns + "/") and created.get(k, ("",))[0] != n)
        r_end, hwm = mem(proc.pid)
        w0, w1 = watches(m0), watches(m1)
        print(f"relay with {len(nodes)} agents on one relay process: first view for all in {connect_s:.0f}s; "
              f"relay RSS {r_conn:.0f} MB connected, {r_end:.0f} MB after the sample, peak {hwm:.0f} MB (goal < 1 GB)")
        print(f"  API-server WATCH requests added by the relay, by resource: "
              + ", ".join(f"{k} {w1.get(k, 0) - w0.get(k, 0):+.0f}" for k in sorted(set(w0) | set(w1))
                          if w1.get(k, 0) != w0.get(k, 0)))
        if lat:
            print(f"  pod create -> its node's agent has it: {len(lat)}/{len(created)} seen, p50 {lat[len(lat) // 2]:.3f}s, "
                  f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.3f}s, max {lat[-1]:.3f}s (goal p99 < 1 s); "
                  f"pods seen by another node's agent: {foreign}")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        stop(proc)


# --- teams --------------------------------------------------------------------------------
async def teams_part(lc: LocalCluster, kube: Kube, teams: int) -> None:
    from prometheus_client import CollectorRegistry

    from bench_teams import bare_loop, config_text, initial_counts, strip_all, team_counts, wait_counts
    from fleetkeeper.core.manager import Manager
    from fleetkeeper.core.settings import RuntimeSettings
    from fleetkeeper.teams.config import TeamsConfig
    from fleetkeeper.teams.controller import setup

    import yaml
    nodes, _ = await kube.list(NODES)
    gpu = sum(1 for n in nodes if (n["metadata"].get("labels") or {}).get("fleetkeeper.io/pool") == "gpu")
    counts = initial_counts(gpu, teams)
    cfg = TeamsConfig.model_validate(yaml.safe_load(config_text(counts)))
    want = {f"team-{k:02d}": c for k, c in enumerate(counts) if c}
    try:
        await kube.delete(CONFIGMAPS, "fleetkeeper-teams", SYSTEM_NS)
    except errors.NotFound:
        pass
    await strip_all(kube)
    bare_s, bare_writes = await bare_loop(kube, cfg, 16)
    assert await team_counts(kube) == want
    say(f"  teams: bare loop {bare_writes} node patches in {bare_s:.1f}s")
    await strip_all(kube)
    reg = CollectorRegistry()
    mgr = Manager(kube, RuntimeSettings(namespace=SYSTEM_NS, server={"port": 0}, leader_election={"enabled": False}),
                  registry=reg)
    await setup(mgr, {"webhook": {"enabled": False}})
    task = asyncio.create_task(mgr.run())
    try:
        await mgr.wait_synced(900)
        t0 = time.perf_counter()
        await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                       "metadata": {"name": "fleetkeeper-teams", "namespace": SYSTEM_NS},
                                       "data": {"config.yaml": config_text(counts)}}, SYSTEM_NS)
        await wait_counts(kube, want, 1800)
        ctl_s = time.perf_counter() - t0
        tm = mgr.teams
        w0 = tm.writes
        for _ in range(3):
            tm.controller.enqueue("teams")
            r0 = tm.controller.reconciles
            while tm.controller.reconciles == r0:
                await asyncio.sleep(0.05)
        print(f"team convergence at {len(nodes)} nodes, {teams} teams: controller {ctl_s:.1f}s vs bare loop "
              f"{bare_s:.1f}s = {ctl_s / bare_s:.2f}x (goal <= 1.1x); writes {w0} for {bare_writes} nodes changed; "
              f"steady state: 3 reconciles, {tm.writes - w0} writes")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def main(a) -> None:
    parts = a.parts.split(",")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * a.agents + 1024)), hard))
    say(f"== scale benchmark: {a.nodes} nodes, {a.pods} pods, parts {parts}; load average {os.getloadavg()[0]:.1f}")
    lc = LocalCluster(Path(tempfile.mkdtemp(prefix="fk-bench-scale-")))
    t0 = time.monotonic()
    up = await lc.up(a.nodes, 8, create_rate=300.0, progress=lambda m: say(f"  cluster: {m}") if "nodes" in m else None)
    say(f"control plane: {up['ready']} nodes Ready in {time.monotonic() - t0:.0f}s")
    kube = await lc.connect()
    try:
        if a.pods:
            names = sorted(n["metadata"]["name"] for n in (await kube.list(NODES, label_selector="type=kwok"))[0])
            dt = await make_pods(kube, names, a.pods, "scale")
            say(f"{a.pods} pods bound to {len(names)} nodes created in {dt:.0f}s")
        if "rss" in parts:
            await rss_part(lc, kube, a.teams)
        if "relay" in parts:
            await relay_part(lc, kube, a.agents, a.sample)
        if "teams" in parts:
            await teams_part(lc, kube, a.teams)
        pids = lc.state.pids
        print("control plane RSS at the end: " + ", ".join(
            f"{c} {mem(p)[0]:.0f} MB" for c, p in sorted(pids.items())))
    finally:
        await kube.close()
        lc.down(purge=True)


CHILD = """
import asyncio, importlib, json, sys, time, traceback
from pathlib import Path
from fleetkeeper.cli.main import COMPONENTS
from fleetkeeper.core.kube import Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings

def mem():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out

async def main(kubeconfig, controllers):
    kube = await Kube.connect(kubeconfig)
    names = [c for c in controllers.split(",") if c]
    mgr = Manager(kube, RuntimeSettings(namespace="fleetkeeper-system", server={"port": 0},
                                        leader_election={"enabled": False}, controllers=names))
    for name in names:
        await importlib.import_module(f"{COMPONENTS[name]}.controller").setup(mgr, None)
    task = asyncio.create_task(mgr.run())
    t0 = time.monotonic()
    try:
        synced = asyncio.create_task(mgr.wait_synced(1800))
        done, _ = await asyncio.wait({task, synced}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            exc = task.exception()
            print(json.dumps({"error": "".join(traceback.format_exception(exc))[-1500:] if exc else "manager returned"}))
            return
        ready = time.monotonic() - t0
        m0 = mem()
        await asyncio.sleep(10)
        print(json.dumps({"ready": ready, "rss_ready": m0["VmRSS"], **mem(),
                          "informers": {k: len(v) for k, v in getattr(mgr, "_informers", {}).items()}
                          if isinstance(getattr(mgr, "_informers", None), dict) else {}}))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def rss_children(kubeconfig: str, runs: list[tuple[str, str]]) -> None:
    """Each run in its own process, all at once: RSS once the manager's informers are synced."""
    import json

    async def one(label: str, ctl: str) -> tuple[str, dict]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, kubeconfig, ctl,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        try:
            return label, json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return label, {"error": err.decode()[-800:]}
    results = await asyncio.gather(*(one(label, ctl) for label, ctl in runs))
    base = next((r.get("VmRSS") for label, r in results if label.startswith("no controller")), None)
    for label, r in results:
        if "error" in r:
            print(f"  {label:30s} failed: {r['error']}")
        else:
            extra = "" if base is None or label.startswith("no controller") else f" (+{r['VmRSS'] - base:.0f} MB over the bare manager)"
            print(f"  {label:30s} {r['VmRSS']:6.0f} MB 10 s after synced ({r['ready']:.0f} s to sync), peak {r['VmHWM']:.0f} MB{extra}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-only":
        # against a running cluster: bench_scale.py --rss-only KUBECONFIG
        runs = [("no controller (manager only)", "")] + [(c, c) for c in CONTROLLERS] + \
            [("every controller", ",".join(CONTROLLERS))]
        asyncio.run(rss_children(sys.argv[2], runs))
        sys.exit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=7500)
    ap.add_argument("--pods", type=int, default=20000)
    ap.add_argument("--agents", type=int, default=7500)
    ap.add_argument("--sample", type=int, default=300, help="pods created to time the relay's fan-out")
    ap.add_argument("--teams", type=int, default=40)
    ap.add_argument("--parts", default="rss,relay,teams")
    args = ap.parse_args()

    async def run() -> None:  # SIGTERM/SIGINT cancel the run, so the cluster is stopped
        import signal
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        await main(args)
    asyncio.run(run())
