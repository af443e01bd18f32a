"""The fleet map in headless Chromium: first meaningful paint and delta-to-pixel latency.

  .venv/bin/python bench/bench_ui.py [--nodes 7500] [--changes 20] [--pages 50] [--synthetic 7500,15000]
                                     [--screenshots docs]

* **control plane** (``--nodes``, 0 to skip): a throw-away local cluster with N nodes, a mix of states
  written the way fleetkeeper writes them (quarantine taints and ladder annotations, the preflight gate,
  team labels and taints); the map runs stand-alone (``fleetkeeper ui``'s code) in this process.
  - first meaningful paint: navigation start to the first full draw of every cell (``performance.now()``
    in the page), over three fresh page loads;
  - delta-to-pixel: a node patched through the API server (taint added) until its cell is repainted in
    the page (the page's ``Date.now()`` at the draw, minus this process's ``time.time()`` before the
    PATCH: same machine, same clock); split into API server + informer + push (the server's stamp on the
    message) and browser; with one page, then with ``--pages`` more pages open;
  - the map's own API requests while pages stream, click and search (expected: none);
  - screenshots of the map (state and team overlays) into ``--screenshots``.
* **synthetic** (``--synthetic``): the same server fed straight into its informer caches (no API server),
  so the browser side can be measured at sizes the machine cannot run as a cluster; delta-to-pixel then
  starts at the informer event.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).parent))
from common import local_cluster  # bench/ helper

from fleetkeeper.core.clock import RealClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import NODES
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.core.views import default_projector
from fleetkeeper.health.decide import Keys
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from fleetkeeper.ui.server import UiOptions, UiServer, setup as ui_setup

N = Names()
K = Keys(N)
TEAMS = ("llm-pretrain", "multimodal", "rl", "safety")
COMPONENTS = {"preflight": "fleetkeeper.preflight", "health": "fleetkeeper.health", "capacity": "fleetkeeper.capacity",
              "relay": "fleetkeeper.relay", "teams": "fleetkeeper.teams"}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='fk-bench-chromium-')}",
              "--window-size=1600,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))


async def js(d, script, *args):
    return await asyncio.to_thread(d.execute_script, script, *args)


async def first_paint(d, url: str, count: int, loads: int = 3) -> list[float]:
    out = []
    for _ in range(loads):
        await asyncio.to_thread(d.get, url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            fp, n = await js(d, "return window.__fleet ? [window.__fleet.firstPaint(), window.__fleet.count()] : [null, 0]")
            if fp is not None and n >= count:
                out.append(fp)
                break
            await asyncio.sleep(0.1)
        else:
            raise SystemExit(f"the page did not paint {count} nodes in 120 s")
    return out


async def delta_to_pixel(d, change, names: list[str], changes: int, state: str) -> tuple[list[float], list[float]]:
    """(write -> pixel, server push -> pixel) in ms for `changes` nodes, one every 0.5 s."""
    await js(d, "window.__fleet.paints().length = 0")
    t0s = {}
    for name in names[:changes]:
        t0s[name] = time.time()
        await change(name)
        await asyncio.sleep(0.5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        paints = await js(d, "return window.__fleet.paints()")
        got = {}
        for n, st, at, ts in paints:
            if n in t0s and st == state and n not in got and at / 1000 >= t0s[n]:
                got[n] = (at / 1000 - t0s[n], (at / 1000 - ts) if ts else float("nan"))
        if len(got) == len(t0s):
            return [v[0] * 1000 for v in got.values()], [v[1] * 1000 for v in got.values()]
        await asyncio.sleep(0.5)
    raise SystemExit(f"only {len(got)} of {len(t0s)} changes reached the page")


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return f"p50 {statistics.median(xs):.0f} ms, p90 {p(0.9):.0f} ms, max {xs[-1]:.0f} ms (n={len(xs)})"


async def open_pages(url: str, pages: int) -> tuple[aiohttp.ClientSession, list, asyncio.Task]:
    s = aiohttp.ClientSession()
    streams = [await s.get(url + "api/stream") for _ in range(pages)]

    async def drain(r):
        try:
            async for _ in r.content.iter_any():
                pass
        except (aiohttp.ClientError, asyncio.CancelledError):
            pass
    task = asyncio.gather(*(drain(r) for r in streams))
    return s, streams, task


async def close_pages(s, streams, task) -> None:
    for r in streams:
        r.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await s.close()


# --- on the control plane ----------------------------------------------------------------------------
async def prepare(kube, names: list[str]) -> dict[str, int]:
    """A fleet that looks lived in: teams on a third, and a few nodes in each fleetkeeper state."""
    rnd = random.Random(7)
    plan: dict[str, dict] = {}
    for i, n in enumerate(names):
        taints, labels, ann = [], {}, {}
        if i % 3 == 0:
            t = TEAMS[(i // 3) % len(TEAMS)]
            labels[N.team] = t
            taints.append({"key": N.team, "value": t, "effect": "NoSchedule"})
        r = rnd.random()
        if r < 0.010:
            taints.append({"key": N.quarantine, "value": "GPUXidError", "effect": "NoSchedule"})
            ann = {K.action: "quarantine", K.reason: "GPUXidError/Xid79"}
        elif r < 0.015:
            taints.append({"key": N.quarantine, "value": "ecc", "effect": "NoSchedule"})
            ann = {K.action: "drain", K.drained: "1"}
        elif r < 0.018:
            taints.append({"key": N.quarantine, "value": "gpu-missing", "effect": "NoSchedule"})
            ann = {K.action: "terminate"}
        elif r < 0.030:
            taints.append({"key": N.preflight, "value": "pending", "effect": "NoSchedule"})
            labels[N.preflight] = "pending"
        if taints or labels:
            plan[n] = {"metadata": {"labels": labels, "annotations": ann}, "spec": {"taints": taints}}
    sem = asyncio.Semaphore(32)

    async def one(n, body):
        async with sem:
            await kube.patch(NODES, n, body)
    await asyncio.gather(*(one(n, b) for n, b in plan.items()))
    return {"patched": len(plan)}


def api_requests(reg: CollectorRegistry) -> float:
    return sum(s.value for m in reg.collect() if m.name == "fleetkeeper_api_requests"
               for s in m.samples if s.name == "fleetkeeper_api_requests_total")


async def bench_cluster(nodes: int, changes: int, pages: int, shots: Path | None) -> None:
    async with local_cluster(nodes, "fk-bench-ui-") as lc:
        kube = await lc.connect()
        items, _ = await kube.list(NODES)
        names = sorted(n["metadata"]["name"] for n in items)
        t = time.monotonic()
        print(f"prepared {(await prepare(kube, names))['patched']} nodes in {time.monotonic() - t:.0f}s", flush=True)
        own = await lc.connect()
        reg = CollectorRegistry()
        mgr = Manager(own, RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}, dry_run=True),
                      registry=reg)
        before_rss = rss_mb()
        ui = await ui_setup(mgr, UiOptions(port=0, components=COMPONENTS))
        t = time.monotonic()
        task = asyncio.create_task(mgr.run())
        while True:  # a loaded machine lists slowly: say what is still listing
            try:
                await mgr.wait_synced(30)
                break
            except TimeoutError:
                if task.done():
                    raise
                waiting = [f"{i.resource.plural}{'/' + i.namespace if i.namespace else ''}"
                           for i in mgr._informers.values() if not i.synced]
                print(f"  still listing after {time.monotonic() - t:.0f}s: {', '.join(waiting)}", flush=True)
                if time.monotonic() - t > 1500:
                    raise
        print(f"map server: caches synced in {time.monotonic() - t:.1f}s; process max RSS {before_rss:.0f} -> "
              f"{rss_mb():.0f} MiB", flush=True)
        while ui._runner is None:
            await asyncio.sleep(0.1)
        d = await asyncio.to_thread(browser)
        try:
            fps = await first_paint(d, ui.url, nodes)
            print(f"[{nodes} nodes, control plane] first meaningful paint: {', '.join(f'{x:.0f}' for x in fps)} ms "
                  f"(median {statistics.median(fps):.0f} ms)", flush=True)
            if shots:
                await asyncio.sleep(1.5)  # the panels' first message
                await asyncio.to_thread(d.save_screenshot, str(shots / f"ui-map-{nodes}.png"))
                await js(d, "const s = document.getElementById('overlay'); s.value = 'team'; "
                            "s.dispatchEvent(new Event('change'))")
                await asyncio.sleep(1.0)
                await asyncio.to_thread(d.save_screenshot, str(shots / f"ui-map-{nodes}-teams.png"))
                await js(d, "const s = document.getElementById('overlay'); s.value = 'state'; "
                            "s.dispatchEvent(new Event('change'))")
            healthy = [n for n, c in zip(names, await js(d, "return arguments[0].map(n => window.__fleet.cell(n)[3])",
                                                          names)) if c == "in-service"]
            random.Random(3).shuffle(healthy)

            async def quarantine(n):
                await kube.patch(NODES, n, {"spec": {"taints": [{"key": N.quarantine, "value": "bench",
                                                                   "effect": "NoSchedule"}]}})
            req0 = api_requests(reg)
            total, browser_side = await delta_to_pixel(d, quarantine, healthy, changes, "quarantined")
            print(f"[{nodes} nodes, control plane, 1 page] delta-to-pixel (PATCH -> repainted cell): "
                  f"{summary(total)}; of which server push -> paint {summary(browser_side)}", flush=True)
            s, streams, drain = await open_pages(ui.url, pages)
            try:
                await asyncio.sleep(2)
                total, browser_side = await delta_to_pixel(d, quarantine, healthy[changes:], changes, "quarantined")
                print(f"[{nodes} nodes, control plane, 1 + {pages} pages] delta-to-pixel: {summary(total)}; "
                      f"of which server push -> paint {summary(browser_side)}", flush=True)
            finally:
                await close_pages(s, streams, drain)
            print(f"map's own API requests while {pages + 1} pages streamed and {2 * changes} changes were pushed: "
                  f"{api_requests(reg) - req0:.0f}", flush=True)
        finally:
            await asyncio.to_thread(d.quit)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await own.close()
            await kube.close()


# --- synthetic (no API server) -----------------------------------------------------------------------
class _Mgr:
    """What UiServer takes from a Manager, with informers filled by hand."""

    def __init__(self):
        self.names, self.clock, self.settings = N, RealClock(), RuntimeSettings(dry_run=True)
        self.projector, self.registry, self.kube, self._infs = default_projector(N.domain), CollectorRegistry(), None, {}

    def informer(self, res, project, namespace=None, key="", **kw):
        k = (res, namespace, key)
        if k not in self._infs:
            inf = Informer(None, res, project)  # type: ignore[arg-type]
            inf._synced.set()
            self._infs[k] = inf
        return self._infs[k]


def synthetic_node(spec: FleetSpec, i: int, rv: int, quarantined: bool = False) -> dict:
    m = node_manifest(spec, i)
    m["metadata"]["resourceVersion"] = str(rv)
    m["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    if i % 3 == 0:
        t = TEAMS[(i // 3) % len(TEAMS)]
        m["metadata"]["labels"][N.team] = t
        m["spec"]["taints"] = [{"key": N.team, "value": t, "effect": "NoSchedule"}]
    if quarantined:
        m["spec"].setdefault("taints", []).append({"key": N.quarantine, "value": "bench", "effect": "NoSchedule"})
    return m


async def bench_synthetic(nodes: int, changes: int, shots: Path | None) -> None:
    mgr = _Mgr()
    ui = UiServer(mgr, UiOptions(port=0, components=COMPONENTS))
    spec = FleetSpec(nodes=nodes, nodes_per_rack=16)
    for i in range(nodes):
        ui.nodes._apply("ADDED", synthetic_node(spec, i, 1))
    await ui.start()
    loops = asyncio.gather(ui._flush_loop(), ui._panels_loop())
    d = await asyncio.to_thread(browser)
    try:
        fps = await first_paint(d, ui.url, nodes)
        print(f"[{nodes} nodes, synthetic] first meaningful paint: {', '.join(f'{x:.0f}' for x in fps)} ms "
              f"(median {statistics.median(fps):.0f} ms)", flush=True)
        if shots:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(d.save_screenshot, str(shots / f"ui-map-{nodes}-synthetic.png"))
        rv = iter(range(2, 10**9))

        async def quarantine(n):
            ui.nodes._apply("MODIFIED", synthetic_node(spec, int(n.rsplit("-", 1)[1]), next(rv), True))
        idx = list(range(nodes))
        random.Random(5).shuffle(idx)
        names = [node_manifest(spec, i)["metadata"]["name"] for i in idx]
        total, browser_side = await delta_to_pixel(d, quarantine, names, changes, "quarantined")
        print(f"[{nodes} nodes, synthetic] delta-to-pixel (informer event -> repainted cell): {summary(total)}; "
              f"of which server push -> paint {summary(browser_side)}", flush=True)
    finally:
        await asyncio.to_thread(d.quit)
        loops.cancel()
        await asyncio.gather(loops, return_exceptions=True)
        await ui.stop()


async def main(a) -> None:
    shots = Path(a.screenshots) if a.screenshots else None
    if a.nodes:
        await bench_cluster(a.nodes, a.changes, a.pages, shots)
    for n in [int(x) for x in a.synthetic.split(",") if x]:
        await bench_synthetic(n, a.changes, shots)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=7500)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--pages", type=int, default=50)
    p.add_argument("--synthetic", default="7500,15000")
    p.add_argument("--screenshots", default="")
    asyncio.run(main(p.parse_args()))
