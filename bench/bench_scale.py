"""fleetkeeper at full scale on one local control plane: manager memory with
every component, the relay with one agent per node, team convergence.

    .venv/bin/python bench/bench_scale.py [--nodes 7500] [--pods 20000] [--agents 7500]
                                          [--parts rss,relay,teams] [--teams 40] [--rss-before SRC]

rss     the controller manager as its own process, once with no controller,
        once with each controller alone and once with every controller (all
        at once), against the cluster holding ``--pods`` pods bound to its
        nodes; RSS (VmRSS, and VmHWM, the peak) 10 s after its informers
        synced. The breakdown per component is "alone" minus "no controller".
        ``bench_scale.py --rss-only KUBECONFIG`` runs only this part against
        a cluster that is already up.
relay   ``fleetkeeper relay serve`` as its own process and ``--agents``
        agents (one per node, each following its node), spread over
        ``--agent-processes`` processes (bench/relay_agents.py) and started
        at ``--agent-rate`` per second in all;
        API-server WATCH requests by resource before and after; relay RSS;
        pod create -> the node's agent has it, for a sample of pods created
        while every agent is connected.
teams   the teams controller converging ``--teams`` teams from scratch vs a
        bare loop of the same patches (bench/bench_teams.py's), then 3 forced
        reconciles at steady state (writes must be 0), then ``--burst-rounds``
        rounds of 1,000-pod bursts through the webhook (bench_teams.bursts)
        with this manager's caches holding every node and pod.

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
import signal
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
from bench_relay import say  # noqa: E402  bench/ helpers
from common import parse_metrics, scrape, total  # noqa: E402

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
async def rss_part(lc: LocalCluster, kube: Kube, teams: int, before: str = "") -> None:
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
    runs: list[tuple] = [("no controller (manager only)", "")] + [(c, c) for c in CONTROLLERS] + \
        [("every controller", ",".join(CONTROLLERS))]
    if before:  # the code before a change, side by side in the same cluster: first bare, every controller last
        runs = [("before: no controller", "", before)] + runs + [("before: every controller", ",".join(CONTROLLERS), before)]
    await rss_children(str(lc.kubeconfig), runs)


# --- relay --------------------------------------------------------------------------------
def watches(m: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in m.items():
        if k.startswith("apiserver_longrunning_requests{") and 'verb="WATCH"' in k and 'subresource=""' in k:
            res = k.split('resource="', 1)[1].split('"', 1)[0]
            out[res] = out.get(res, 0) + v
    return out


def netstat(*names: str) -> dict[str, int]:
    """TcpExt counters of the machine (ListenOverflows: connections dropped because
    an accept queue was full)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    out: dict[str, int] = {}
    for head, vals in zip(lines[::2], lines[1::2]):
        for k, v in zip(head.split()[1:], vals.split()[1:]):
            if k in names:
                out[k] = int(v)
    return out


async def start_agents(script: str, url: str, nodes: list[str], workers: int, rate: float,
                       prefix: str) -> list[asyncio.subprocess.Process]:
    procs = []
    for w in range(workers):
        p = await asyncio.create_subprocess_exec(sys.executable, script, url, str(rate / workers), prefix,
                                                 stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                 limit=64 * 1024 * 1024)
        p.stdin.write((" ".join(nodes[w::workers]) + "\n").encode())
        await p.stdin.drain()
        procs.append(p)
    return procs


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class CpuCap:
    """The relay held to a share of one core (cgroup v1 CFS quota), as when it ran beside other
    control planes on this machine at 3-7 % of a core: the overload reproduced on purpose."""

    ROOT = Path("/sys/fs/cgroup/cpu")

    def __init__(self, share: float, pid: int):
        self.dir: Path | None = None
        if not share:
            return
        if not (self.ROOT / "cpu.cfs_quota_us").exists():
            raise SystemExit(f"--relay-cpu-share needs the cgroup v1 cpu controller at {self.ROOT}")
        self.dir = self.ROOT / f"fk-bench-relay-{pid}"
        self.dir.mkdir()
        (self.dir / "cpu.cfs_period_us").write_text("100000")
        (self.dir / "cpu.cfs_quota_us").write_text(str(max(1000, int(share * 100000))))
        (self.dir / "cgroup.procs").write_text(str(pid))

    def lift(self, pid: int) -> None:
        """Back to the whole machine (the process leaves the capped group)."""
        if self.dir is not None and self.dir.exists():
            try:
                (self.ROOT / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
            self.remove()

    def remove(self) -> None:
        if self.dir is not None and self.dir.exists():
            for _ in range(50):
                try:
                    self.dir.rmdir()
                    return
                except OSError:  # the process is still leaving it
                    time.sleep(0.1)


class Profiler:
    """py-spy on the relay, one raw profile per phase (``--profile DIR``)."""

    def __init__(self, directory: str | None, pid: int, name: str = "relay"):
        self.dir = Path(directory) if directory else None
        self.pid, self.name = pid, name
        self.proc: subprocess.Popen | None = None
        self.files: list[Path] = []

    def start(self, phase: str) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        out = self.dir / f"{self.name}-{phase}.txt"
        self.files.append(out)
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(self.pid),
                                      "--nonblocking", "--rate", "50", "--format", "raw", "-o", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def relay_counters(text: str) -> dict[str, float]:
    return parse_metrics(text, "fleetkeeper_relay_")


async def relay_metrics(mport: int, timeout: float = 60.0) -> dict[str, float]:
    """The relay's counters (its /metrics is served by the relay's own event loop: slow when it is behind)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.get(f"http://127.0.0.1:{mport}/metrics") as r:
            return relay_counters(await r.text())
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return {}


def requests_by(m: dict[str, float], endpoint: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in m.items():
        if k.startswith("fleetkeeper_relay_requests_total{") and f'endpoint="{endpoint}"' in k and v:
            out[k.split('code="', 1)[1].split('"', 1)[0]] = v
    return out


async def herd(script: str, url: str, nodes: list[str], seconds: float, pid: int, mport: int,
               cap: "CpuCap") -> None:
    """Every agent at once from one process, for up to ``seconds`` (the relay held to its CPU cap, if any)."""
    import json

    o0 = netstat("ListenOverflows", "ListenDrops")
    r0 = await relay_metrics(mport)
    (p,) = await start_agents(script, url, nodes, 1, 0.0, "-")
    last: dict = {}

    async def read() -> None:
        while line := await p.stdout.readline():
            last.update(json.loads(line))
    reader = asyncio.create_task(read())
    t0 = time.monotonic()
    peak_fds = 0
    done_s = None
    shown = 0.0
    try:
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(1.0)
            peak_fds = max(peak_fds, fds(pid))
            if last.get("first") == len(nodes):
                done_s = time.monotonic() - t0
                break
            if time.monotonic() - shown >= 15:
                shown = time.monotonic()
                say(f"  herd at {shown - t0:.0f}s: {last.get('first')}/{len(nodes)} have their first view; client "
                    f"retries {last.get('retries')} (503: {last.get('busy', 0)}); relay fds {fds(pid)}; load average "
                    f"{os.getloadavg()[0]:.1f}")
        o1 = netstat("ListenOverflows", "ListenDrops")
        at_end = dict(last)
        cap.lift(pid)  # the counters are read, and the herd stopped, at full speed
        r1 = await relay_metrics(mport)
    finally:
        if p.returncode is None:
            p.stdin.close()
            try:
                await asyncio.wait_for(p.wait(), 60)
            except asyncio.TimeoutError:
                p.kill()
                await p.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    v0, v1 = requests_by(r0, "view"), requests_by(r1, "view")
    views = {c: v1[c] - v0.get(c, 0) for c in v1 if v1[c] - v0.get(c, 0)}
    print(f"  all {len(nodes)} agents at once from one process: {at_end.get('first')} had their first view after "
          f"{done_s if done_s is not None else time.monotonic() - t0:.0f}s"
          f"{'' if done_s is not None else ' (gave up)'}; client retries (timeouts, refused, 503) "
          f"{at_end.get('retries')} (of which 503 {at_end.get('busy', 0)}); relay answered views by code {views} "
          f"(499: dropped, the client had gone); relay peak file descriptors {peak_fds}; "
          f"accept-queue overflows {o1.get('ListenOverflows', 0) - o0.get('ListenOverflows', 0)}, "
          f"SYNs dropped {o1.get('ListenDrops', 0) - o0.get('ListenDrops', 0)}; load average "
          f"{os.getloadavg()[0]:.1f}")


async def relay_part(lc: LocalCluster, kube: Kube, agents_n: int, sample: int, workers: int = 4,
                     rate: float = 250.0, herd_s: float = 0.0, profile: str | None = None,
                     relay_args: tuple[str, ...] = (), cpu_share: float = 0.0) -> None:
    """One relay process; ``agents_n`` agents spread over ``workers`` processes
    (bench/relay_agents.py), started at ``rate`` agents per second in all
    (after, with ``herd_s``, up to ``herd_s`` seconds of every agent at once from one process)."""
    import json

    nodes = sorted(n["metadata"]["name"] for n in (await kube.list(NODES, label_selector="type=kwok"))[0]
                   + (await kube.list(NODES, label_selector=BARE_LABEL))[0])[:agents_n]
    port, mport = free_port(), free_port()
    m0 = await scrape(lc)
    proc = subprocess.Popen([FK, "relay", "serve", "--listen", f"127.0.0.1:{port}", "--metrics-port", str(mport),
                             "--kubeconfig", str(lc.kubeconfig), "--namespace", SYSTEM_NS, "--log-level", "warning",
                             *relay_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ns = "scale-relay"
    procs: list[asyncio.subprocess.Process] = []
    prof = Profiler(profile, proc.pid)
    cap = CpuCap(0.0, proc.pid)
    api_pid = lc.state.pids["kube-apiserver"]
    try:
        ready = await wait_http(f"http://127.0.0.1:{mport}/readyz", 900, proc)
        cpu0 = cpu_s(proc.pid)
        say(f"  relay: synced in {ready:.0f}s, RSS {mem(proc.pid)[0]:.0f} MB; connecting {len(nodes)} agents from "
            f"{workers} processes at {rate:.0f}/s; load average {os.getloadavg()[0]:.1f}")
        url = f"http://127.0.0.1:{port}"
        script = str(Path(__file__).resolve().parent / "relay_agents.py")
        if herd_s:
            if cpu_share:
                cap = CpuCap(cpu_share, proc.pid)
                say(f"  relay held to {cpu_share:.0%} of one core (cgroup cpu quota) for the herd")
            prof.start("herd")
            await herd(script, url, nodes, herd_s, proc.pid, mport, cap)
            prof.stop()
            await asyncio.sleep(10)
            cpu0 = cpu_s(proc.pid)
        o0 = netstat("ListenOverflows", "ListenDrops")
        r0 = await relay_metrics(mport)
        t0 = time.monotonic()
        prof.start("connect")
        procs = await start_agents(script, url, nodes, workers, rate, ns + "/")
        status: list[dict] = [{} for _ in procs]

        async def read_status(i: int, p: asyncio.subprocess.Process) -> None:
            while line := await p.stdout.readline():
                status[i] = json.loads(line)
                if status[i].get("final"):
                    return
        readers = [asyncio.create_task(read_status(i, p)) for i, p in enumerate(procs)]
        last = 0.0
        peak_fds = 0
        loads = []
        while sum(s.get("first", 0) for s in status) < len(nodes):
            if time.monotonic() - t0 > 900:
                raise TimeoutError(f"only {sum(s.get('first', 0) for s in status)} of {len(nodes)} agents had "
                                   f"their first view after 900 s")
            peak_fds = max(peak_fds, fds(proc.pid))
            if time.monotonic() - last > 15:
                last = time.monotonic()
                loads.append(os.getloadavg()[0])
                say(f"  relay: {sum(s.get('first', 0) for s in status)}/{len(nodes)} agents have their first view; "
                    f"relay RSS {mem(proc.pid)[0]:.0f} MB, {fds(proc.pid)} fds; load average {loads[-1]:.1f}")
            await asyncio.sleep(0.5)
        connect_s = time.monotonic() - t0
        prof.stop()
        o1 = netstat("ListenOverflows", "ListenDrops")
        await asyncio.sleep(5)
        m1 = await scrape(lc)
        r1 = await relay_metrics(mport)
        r_conn, _ = mem(proc.pid)
        cpu1 = cpu_s(proc.pid)
        say(f"  relay: {len(nodes)} agents have their first view after {connect_s:.0f}s; relay RSS {r_conn:.0f} MB")
        try:
            await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        except errors.Conflict:
            pass
        # idle window (no pods created), then the sample window of the same length: the difference in CPU is
        # what the fan-out of the sample's events cost, the idle part is bookmarks and open watches
        window = sample * 0.05 + 10
        agent_pids = [p.pid for p in procs]
        prof.start("idle")
        c_idle0 = (cpu_s(proc.pid), sum(cpu_s(x) for x in agent_pids), cpu_s(api_pid))
        t_idle = time.monotonic()
        await asyncio.sleep(window)
        t_idle = time.monotonic() - t_idle
        c_idle1 = (cpu_s(proc.pid), sum(cpu_s(x) for x in agent_pids), cpu_s(api_pid))
        prof.stop()
        r_idle = await relay_metrics(mport)
        # fan-out: pods created one at a time (20/s) on random nodes; when does that node's agent have it?
        prof.start("sample")
        t_sample = time.monotonic()
        created: dict[str, tuple[str, float]] = {}
        rng = random.Random(7)
        load_sample = os.getloadavg()[0]
        for i in range(sample):
            node = rng.choice(nodes)
            key = f"{ns}/f-{i:04d}"
            created[key] = (node, time.monotonic())
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"f-{i:04d}"},
                                     "spec": {"nodeName": node, "tolerations": [{"operator": "Exists"}],
                                              "containers": [{"name": "c", "image": "i"}]}}, ns)
            await asyncio.sleep(0.05)
        await asyncio.sleep(10)  # the last ones reach their agents (or are counted as not seen)
        cpu2 = cpu_s(proc.pid)
        t_sample = time.monotonic() - t_sample
        c_s1 = (cpu2, sum(cpu_s(x) for x in agent_pids), cpu_s(api_pid))
        prof.stop()
        r2 = await relay_metrics(mport)
        load_sample = max(load_sample, os.getloadavg()[0])
        for p in procs:
            p.stdin.close()
        await asyncio.wait_for(asyncio.gather(*readers), 300)
        seen: dict[str, list] = {}
        for st in status:
            seen.update(st.get("seen") or {})
        lat = sorted(seen[k][1] - created[k][1] for k in created if k in seen and seen[k][0] == created[k][0])
        foreign = sum(1 for k, (node, _) in seen.items() if k in created and created[k][0] != node)
        first = sorted(x for st in status for x in st.get("first_view") or [])
        r_end, hwm = mem(proc.pid)
        w0, w1 = watches(m0), watches(m1)
        v0, v1 = requests_by(r0, "view"), requests_by(r1, "view")
        views = {c: v1[c] - v0.get(c, 0) for c in v1 if v1[c] - v0.get(c, 0)}
        print(f"relay with {len(nodes)} agents on one relay process ({workers} agent processes, started at "
              f"{rate:.0f}/s, so the last starts at {len(nodes) / rate:.0f}s): all had their first view after "
              f"{connect_s:.0f}s (first views p50 {first[len(first) // 2]:.1f}s, max {first[-1]:.1f}s after start); "
              f"client retries {sum(st.get('retries', 0) for st in status)} (of which 503 "
              f"{sum(st.get('busy', 0) for st in status)}), relay answered views by code {views}, "
              f"relay peak file descriptors {peak_fds}, accept-queue overflows "
              f"{o1.get('ListenOverflows', 0) - o0.get('ListenOverflows', 0)}; "
              f"relists after the first view {sum(st.get('relists', 0) for st in status)}; "
              f"relay RSS {r_conn:.0f} MB connected, {r_end:.0f} MB after the sample, peak {hwm:.0f} MB (goal < 1 GB); "
              f"relay CPU {cpu1 - cpu0:.1f}s connecting; load average while connecting "
              f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f}")
        print("  API-server WATCH requests added by the relay, by resource: "
              + ", ".join(f"{k} {w1.get(k, 0) - w0.get(k, 0):+.0f}" for k in sorted(set(w0) | set(w1))
                          if w1.get(k, 0) != w0.get(k, 0)))
        fan = r2.get("fleetkeeper_relay_events_fanned_out_total", 0) - r_idle.get(
            "fleetkeeper_relay_events_fanned_out_total", 0)
        up_ev = sum(v for k, v in r2.items() if k.startswith("fleetkeeper_relay_upstream_events_total")) - sum(
            v for k, v in r_idle.items() if k.startswith("fleetkeeper_relay_upstream_events_total"))
        d_idle = [(b - a) / t_idle for a, b in zip(c_idle0, c_idle1)]
        d_s = [(b - a) / t_sample for a, b in zip(c_idle1, c_s1)]
        print(f"  CPU (share of one core) idle {t_idle:.0f} s (open watches, bookmarks) / sample {t_sample:.0f} s "
              f"({sample} pods): relay {d_idle[0]:.1%} / {d_s[0]:.1%}, the {workers} agent processes together "
              f"{d_idle[1]:.1%} / {d_s[1]:.1%}, kube-apiserver {d_idle[2]:.1%} / {d_s[2]:.1%}; relay upstream events "
              f"in the sample {up_ev:.0f}, deliveries to agents {fan:.0f}: relay CPU per upstream event over idle "
              f"{(d_s[0] - d_idle[0]) * t_sample / max(up_ev, 1) * 1000:.2f} ms; load average in the sample "
              f"{load_sample:.1f}")
        if lat:
            print(f"  pod create -> its node's agent has it: {len(lat)}/{len(created)} seen, p50 {lat[len(lat) // 2]:.3f}s, "
                  f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.3f}s, max {lat[-1]:.3f}s (goal p99 < 1 s); "
                  f"pods seen by another node's agent: {foreign}")
        else:
            print(f"  pod create -> its node's agent has it: 0/{len(created)} seen")
        if prof.files:
            from pyspy_summary import RELAY_FRAMES, load, summarise
            for f in prof.files:
                if f.exists():
                    print(f"  py-spy of the relay, {f.name}:")
                    print("    " + summarise(load(str(f)), 20, RELAY_FRAMES).replace("\n", "\n    "))
    finally:
        prof.stop()
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        cap.lift(proc.pid)
        stop(proc)


def cpu_s(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


# --- teams --------------------------------------------------------------------------------
class Converged:
    """Counts of consistently labelled and tainted team nodes in the manager's node cache, kept by a handler
    on its informer: no scan of every node while the controller is measured (and no API request)."""

    def __init__(self, informer, want: dict[str, int]):
        from bench_teams import NAMES
        self.key, self.want = NAMES.team, want
        self.team: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        for v in informer.items():
            self.on(v.name, v)
        informer.add_handler(lambda typ, key, old, new: self.on(key, None if typ == "DELETED" else new))

    def on(self, name: str, v) -> None:
        t = v.labels.get(self.key, "") if v is not None else ""
        if t and not any(x.key == self.key and x.value == t for x in v.taints):
            t = ""
        was = self.team.pop(name, "")
        if was:
            self.counts[was] -= 1
            if not self.counts[was]:
                del self.counts[was]
        if t:
            self.team[name] = t
            self.counts[t] = self.counts.get(t, 0) + 1

    async def wait(self, timeout: float) -> None:
        end = time.perf_counter() + timeout
        while self.counts != self.want:
            if time.perf_counter() > end:
                raise RuntimeError(f"did not converge in {timeout}s: {self.counts} != {self.want}")
            await asyncio.sleep(0.05)


async def sample_writes(tm, t0: float, period: float = 0.5) -> list[tuple[float, int, int, int]]:
    """(seconds since t0, writes so far, node writes in flight, reconciles so far) every ``period``, until
    cancelled."""
    from fleetkeeper.core.events import NODE_WRITES
    out: list[tuple[float, int, int, int]] = []
    try:
        while True:
            out.append((time.perf_counter() - t0, tm.writes, NODE_WRITES.inflight, tm.controller.reconciles))
            await asyncio.sleep(period)
    except asyncio.CancelledError:
        return out


def breakdown(samples: list[tuple[float, int, int, int]], total_s: float, writes: int, reg) -> str:
    """Time to the first write, the write rate over each tenth of the writing time, in-flight writes, plan passes."""
    first = next((t for t, w, _, _ in samples if w), None)
    parts = [f"first write by {first:.1f}s" if first is not None else "no write"]
    last = next((t for t, w, _, _ in samples if w >= writes), total_s)
    parts.append(f"last write by {last:.1f}s, cache converged at {total_s:.1f}s")
    if first is not None and writes:
        def at(t: float) -> int:  # writes done by t
            return max((w for ts, w, _, _ in samples if ts <= t), default=0)
        step = max(last - first, 1e-3) / 10
        rates = [f"{(at(first + (k + 1) * step) - at(first + k * step)) / step:.0f}" for k in range(10)]
        parts.append("writes/s per tenth of the writing time " + " ".join(rates))
        busy = [f for t, w, f, _ in samples if first <= t <= last]
        if busy:
            parts.append(f"in flight mean {statistics.mean(busy):.1f} max {max(busy)}")
    conflicts = sum(reg.get_sample_value("fleetkeeper_teams_node_writes_total", {"action": a, "result": "conflict"})
                    or 0 for a in ("assign", "replace", "release", "move", "repair"))
    parts.append(f"{conflicts:.0f} conflicts (node changed since the plan)")
    n = reg.get_sample_value("fleetkeeper_teams_plan_seconds_count") or 0
    s = reg.get_sample_value("fleetkeeper_teams_plan_seconds_sum") or 0
    parts.append(f"{samples[-1][3] if samples else 0} reconciles, {n:.0f} plan passes, {s:.1f}s planning in all")
    return "; ".join(parts)


def apiserver_text(a: dict[str, float], b: dict[str, float]) -> str:
    """kube-apiserver's side of one phase, from two scrapes of its /metrics: node PATCHes and their mean
    duration as it measured them, and Node watch events it sent (to every watcher)."""
    def tot(name: str, *has: str) -> float:
        return sum(v - a.get(k, 0.0) for k, v in b.items() if k.startswith(name + "{") and all(h in k for h in has))
    sel = ('verb="PATCH"', 'resource="nodes"', 'subresource=""')
    n = tot("apiserver_request_duration_seconds_count", *sel)
    s = tot("apiserver_request_duration_seconds_sum", *sel)
    ev = sum(v - a.get(k, 0.0) for k, v in b.items()
             if k.startswith("apiserver_watch_events_total{") and ('"nodes"' in k or 'kind="Node"' in k))
    return f"kube-apiserver: {n:.0f} node PATCHes, mean {1000 * s / max(n, 1):.0f} ms; {ev:.0f} Node watch events sent"


def cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items()))


async def teams_part(lc: LocalCluster, kube: Kube, teams: int, burst_rounds: int = 1,
                     burst_concurrency: int = 32, profile: str | None = None, scan_poller: bool = False,
                     rounds: int = 1) -> None:
    from prometheus_client import CollectorRegistry

    from bench_teams import (bare_loop, bursts, config_text, cpu_seconds, initial_counts, strip_all, team_counts,
                             wait_converged)
    from fleetkeeper.core.manager import Manager
    from fleetkeeper.core.settings import RuntimeSettings
    from fleetkeeper.teams.apply import apply_changes
    from fleetkeeper.teams.config import TeamsConfig
    from fleetkeeper.teams.controller import setup

    import yaml
    nodes, _ = await kube.list(NODES)
    gpu = sum(1 for n in nodes if (n["metadata"].get("labels") or {}).get("fleetkeeper.io/pool") == "gpu")
    counts = initial_counts(gpu, teams)
    cfg = TeamsConfig.model_validate(yaml.safe_load(config_text(counts)))
    want = {f"team-{k:02d}": c for k, c in enumerate(counts) if c}
    try:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}})
    except errors.Conflict:
        pass
    try:
        await kube.delete(CONFIGMAPS, "fleetkeeper-teams", SYSTEM_NS)
    except errors.NotFound:
        pass
    await strip_all(kube)
    prof = Profiler(profile, os.getpid(), "teams")
    bare_s, bare_writes = 0.0, 0

    async def bare(rnd: int) -> float:
        cpu0, m0 = cpu_seconds(lc), await scrape(lc)
        prof.start(f"bare-{rnd}")
        dt, n = await bare_loop(kube, cfg, 16)
        prof.stop()
        cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_seconds(lc).items()}
        api = apiserver_text(m0, await scrape(lc))
        assert await team_counts(kube) == want
        nonlocal bare_writes
        bare_writes = n
        print(f"teams round {rnd}: bare loop {n} node patches in {dt:.1f}s; CPU s {cpu_text(cpu)}; {api}; "
              f"load average {os.getloadavg()[0]:.1f}")
        await strip_all(kube)
        return dt

    async def converge(label: str, before: bool, then_bursts: bool) -> float:
        """A manager with the teams controller from scratch: informers synced, then the ConfigMap created,
        until every node is right in its cache; 3 forced reconciles at steady state. ``before``: as the
        controller and this benchmark did before: a Conflict always left to the next pass (never sent again
        against the newer cached node), and the wait scanning every cached node every 0.05 s on the
        manager's loop."""
        import fleetkeeper.teams.controller as ctl
        scan = before
        if before:
            def earlier(*a, **kw):
                return apply_changes(*a, **{**kw, "current": None})
            ctl.apply_changes = earlier
        else:
            ctl.apply_changes = apply_changes
        reg = CollectorRegistry()
        mgr = Manager(kube, RuntimeSettings(namespace=SYSTEM_NS, server={"port": 0},
                                            leader_election={"enabled": False}), registry=reg)
        # the webhook served and registered only for the burst's namespaces (label bench=teams)
        await setup(mgr, {"webhook": {"enabled": True, "configName": "bench-teams",
                                      "namespaceLabels": {"bench": "teams"}}})
        task = asyncio.create_task(mgr.run())
        try:
            await mgr.wait_synced(900)
            tm = mgr.teams
            conv = Converged(mgr.node_informer(), want)
            cpu0, m0 = cpu_seconds(lc), await scrape(lc)
            prof.start(label.replace(" ", "-"))
            t0 = time.perf_counter()
            sampler = asyncio.create_task(sample_writes(tm, t0))
            await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": "fleetkeeper-teams", "namespace": SYSTEM_NS},
                                           "data": {"config.yaml": config_text(counts)}}, SYSTEM_NS)
            if scan:
                await wait_converged(kube, mgr, want, 1800)
            else:
                await conv.wait(1800)
            ctl_s = time.perf_counter() - t0
            prof.stop()
            sampler.cancel()
            samples = await sampler
            ctl_cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_seconds(lc).items()}
            ctl_api = apiserver_text(m0, await scrape(lc))
            got = await team_counts(kube)
            if got != want:
                raise RuntimeError(f"the cache said converged, the API server says {got} != {want}")
            w0 = tm.writes
            for _ in range(3):
                tm.controller.enqueue("teams")
                r0 = tm.controller.reconciles
                while tm.controller.reconciles == r0:
                    await asyncio.sleep(0.05)
            print(f"team convergence at {len(nodes)} nodes, {teams} teams: {label} {ctl_s:.1f}s vs bare loop "
                  f"{bare_s:.1f}s = {ctl_s / bare_s:.2f}x (goal <= 1.1x); writes {w0} for {bare_writes} nodes "
                  f"changed; steady state: 3 reconciles, {tm.writes - w0} writes; load average "
                  f"{os.getloadavg()[0]:.1f}")
            print(f"  {label}: " + breakdown(samples, ctl_s, w0, reg))
            print(f"  {label}: CPU s {cpu_text(ctl_cpu)}; {ctl_api}")
            if then_bursts:
                # the webhook burst with this manager's informers holding every node and pod
                await bursts(lc, kube, mgr, 1000, burst_rounds, None, burst_concurrency)
            return ctl_s
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:
                await kube.delete(CONFIGMAPS, "fleetkeeper-teams", SYSTEM_NS)
            except errors.NotFound:
                pass

    got: dict[str, list[float]] = {}
    for rnd in range(rounds):
        bare_s = await bare(rnd)
        got.setdefault("bare loop", []).append(bare_s)
        last = rnd == rounds - 1
        got.setdefault("controller", []).append(await converge(f"controller {rnd}", False,
                                                               last and bool(burst_rounds)))
        await strip_all(kube)
        if scan_poller:
            got.setdefault("controller as before", []).append(await converge(f"controller as before {rnd}",
                                                                            True, False))
            await strip_all(kube)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"team convergence at {len(nodes)} nodes, {teams} teams, medians of {rounds} round(s): "
          + "; ".join(f"{k} {v:.1f}s" + ("" if k == "bare loop" else f" = {v / med['bare loop']:.2f}x")
                      for k, v in med.items())
          + f" (goal <= 1.1x); runs {({k: [round(x, 1) for x in v] for k, v in got.items()})}")


BARE_LABEL = "fleetkeeper.io/bench-bare"


async def create_bare_nodes(kube: Kube, n: int) -> int:
    from fleetkeeper.localcluster.fleet import KWOK_LABEL, FleetSpec, node_manifest

    spec = FleetSpec(nodes=n)
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        body = node_manifest(spec, i)
        body["metadata"]["labels"].pop(KWOK_LABEL, None)
        body["metadata"]["labels"][BARE_LABEL] = "true"
        async with sem:
            try:
                await kube.create(NODES, body)
            except errors.Conflict:
                pass
    await asyncio.gather(*(one(i) for i in range(n)))
    return n


async def main(a) -> None:
    parts = a.parts.split(",")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * a.agents + 1024)), hard))
    say(f"== scale benchmark: {a.nodes} nodes, {a.pods} pods, parts {parts}; load average {os.getloadavg()[0]:.1f}")
    if a.cluster_dir:  # a cluster this benchmark started before and left up (stopped at the end)
        lc = LocalCluster(Path(a.cluster_dir))
        if not lc.is_up():
            raise SystemExit(f"no running cluster in {a.cluster_dir}")
        say(f"control plane: reusing {a.cluster_dir}")
    elif a.bare_nodes:  # Node objects KWOK does not manage: enough for the relay, no heartbeats
        lc = LocalCluster(Path(tempfile.mkdtemp(prefix="fk-bench-scale-")))
        t0 = time.monotonic()
        await lc.up(0, 8)
        async with await lc.connect() as k:
            n = await create_bare_nodes(k, a.nodes)
        say(f"control plane with {n} Node objects (not managed by KWOK) in {time.monotonic() - t0:.0f}s")
    else:
        lc = LocalCluster(Path(tempfile.mkdtemp(prefix="fk-bench-scale-")))
        t0 = time.monotonic()
        up = await lc.up(a.nodes, 8, create_rate=300.0,
                         progress=lambda m: say(f"  cluster: {m}") if "nodes" in m else None)
        say(f"control plane: {up['ready']} nodes Ready in {time.monotonic() - t0:.0f}s")
    kube = await lc.connect()
    try:
        if a.pods:
            names = sorted(n["metadata"]["name"] for n in (await kube.list(NODES, label_selector="type=kwok"))[0])
            dt = await make_pods(kube, names, a.pods, "scale")
            say(f"{a.pods} pods bound to {len(names)} nodes created in {dt:.0f}s")
        if "rss" in parts:
            await rss_part(lc, kube, a.teams, a.rss_before)
        for part in parts:  # in the order given
            if part == "relay":
                try:
                    await relay_part(lc, kube, a.agents, a.sample, a.agent_processes, a.agent_rate, a.herd_seconds,
                                     a.profile, tuple(a.relay_arg), a.relay_cpu_share)
                except TimeoutError as exc:  # reported; the other parts still run
                    print(f"relay: {exc}")
            elif part == "teams":
                await teams_part(lc, kube, a.teams, a.burst_rounds, a.burst_concurrency, a.profile, a.teams_scan_poller,
                                 a.teams_rounds)
        pids = lc.state.pids
        print("control plane RSS at the end: " + ", ".join(
            f"{c} {mem(p)[0]:.0f} MB" for c, p in sorted(pids.items())))
    finally:
        await kube.close()
        lc.down(purge=True)


CHILD = """
import os, tracemalloc
if os.environ.get("FK_TRACEMALLOC"):  # where the memory is, by file (slows the process down)
    tracemalloc.start(1)
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
        if os.environ.get("FK_TRIM"):  # what the allocator gives back once the first LISTs are decoded
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        m0 = mem()
        await asyncio.sleep(10)
        top = []
        if tracemalloc.is_tracing():
            stats = tracemalloc.take_snapshot().statistics("filename")
            top = [(str(st.traceback[0].filename).split("site-packages/")[-1].split("src/")[-1], round(st.size / 2**20, 1))
                   for st in stats[:int(os.environ.get("FK_TRACEMALLOC"))]]
        print(json.dumps({"ready": ready, "rss_ready": m0["VmRSS"], **mem(), "top": top,
                          "informers": {str(k): len(v) for k, v in getattr(mgr, "_informers", {}).items()}
                          if isinstance(getattr(mgr, "_informers", None), dict) else {}}))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def rss_children(kubeconfig: str, runs: list[tuple]) -> None:
    """Each run in its own process, one after another (eight managers listing 20,000 pods at once
    overload a small API server): RSS once the manager's informers are synced. A run given as
    (label, controllers, src) imports fleetkeeper from ``src`` (another checkout's ``src``)."""
    import json

    async def one(label: str, ctl: str, src: str = "") -> tuple[str, dict]:
        env = dict(os.environ, PYTHONPATH=src) if src else None
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, kubeconfig, ctl, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        try:
            return label, {**json.loads(out.decode().strip().splitlines()[-1]), "load": os.getloadavg()[0]}
        except (ValueError, IndexError):
            return label, {"error": err.decode()[-800:]}
    results = [await one(*run) for run in runs]
    bases = {label.split(":")[0] if ":" in label else "": r.get("VmRSS") for label, r in results
             if "no controller" in label}
    for label, r in results:
        base = bases.get(label.split(":")[0] if ":" in label else "")
        if "error" in r:
            print(f"  {label:30s} failed: {r['error']}")
        else:
            extra = "" if base is None or "no controller" in label else f" (+{r['VmRSS'] - base:.0f} MB over the bare manager)"
            print(f"  {label:30s} {r['VmRSS']:6.0f} MB 10 s after synced ({r['ready']:.0f} s to sync), peak {r['VmHWM']:.0f} MB{extra}; "
                  f"load average {r['load']:.1f}")
            for path, mb in r.get("top") or []:
                print(f"      {mb:7.1f} MB  {path}")


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
    ap.add_argument("--burst-rounds", type=int, default=1,
                    help="teams part: 1,000-pod webhook bursts (without / own thread / shared loop) after convergence")
    ap.add_argument("--burst-concurrency", type=int, default=32,
                    help="teams part: pods the burst client creates at once (32: CPU-bound here; a few: latency-bound)")
    ap.add_argument("--teams-rounds", type=int, default=1,
                    help="teams part: rounds of bare loop then controller (then controller as before), "
                         "each from scratch; medians printed")
    ap.add_argument("--teams-before", dest="teams_scan_poller", action="store_true",
                    help="teams part: converge a second time as the controller and this benchmark did before "
                         "(Conflicts left to the next pass; the wait scanning every cached node every 0.05 s on "
                         "the manager's loop), side by side")
    ap.add_argument("--agent-processes", type=int, default=4, help="processes the relay agents are spread over")
    ap.add_argument("--agent-rate", type=float, default=250.0, help="agents started per second, in all")
    ap.add_argument("--herd-seconds", type=float, default=0.0,
                    help="first, for this long, every agent at once from one process (how it failed before)")
    ap.add_argument("--profile", help="py-spy raw profiles into this directory: of the relay per phase (relay part); of this process during the bare loop and the controller's convergence (teams part)")
    ap.add_argument("--relay-cpu-share", type=float, default=0.0,
                    help="hold the relay process to this share of one core (cgroup v1 CFS quota), e.g. 0.05")
    ap.add_argument("--relay-arg", action="append", default=[], help="extra flag for `fleetkeeper relay serve`")
    ap.add_argument("--parts", default="rss,relay,teams")
    ap.add_argument("--rss-before", default="", metavar="SRC",
                    help="rss part: also the bare manager (first) and every controller (last) importing fleetkeeper "
                         "from SRC, the src/ of a checkout of the code before a change (git archive REV src | tar -x)")
    ap.add_argument("--bare-nodes", action="store_true",
                    help="Node objects that KWOK does not manage (no heartbeats, pods stay Pending): the relay part "
                         "at full size without a full simulated fleet")
    ap.add_argument("--cluster-dir", help="use the running local cluster in this directory instead of starting one")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="the interpreter's GIL switch interval in seconds (default: Python's 0.005): how long the "
                         "webhook thread may wait for a manager thread that holds the GIL")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    async def run() -> None:  # SIGTERM/SIGINT cancel the run, so the cluster is stopped
        import signal
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        await main(args)
    asyncio.run(run())
