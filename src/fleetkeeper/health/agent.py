"""The node agent: run the check families, turn their findings into Node
conditions, and write them to the node's status subresource only on change
plus a jittered heartbeat.

The agent never watches the API server: it only PATCHes its own node's
``status.conditions`` (strategic merge, merged by ``type``). The heartbeat
(default 5 min +- 20 %) re-asserts every condition the agent owns, which also
restores them if another writer (KWOK's heartbeat stage, a kubelet bug)
rewrote the condition list.

:class:`SimulatedFleet` runs one agent state per simulated (KWOK) node in one
process; their faults come from :class:`fleetkeeper.core.faults.FaultPlan`
and go through the same check code (a fault GPU backend feeds
:class:`GpuCheck`; maintenance faults are rendered as Azure Scheduled Events
documents and parsed by the Azure parser).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.faults import Fault, FaultPlan
from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.health.checks import DiskCheck, GpuCheck, NetworkCheck
from fleetkeeper.health.cloud import MaintenanceCheck, parse_azure
from fleetkeeper.health.conditions import (
    AGENT_TYPES,
    DISK_UNHEALTHY,
    MAINTENANCE,
    NETWORK_UNREACHABLE,
    Finding,
    WriteState,
    heartbeat_delay,
    merge_findings,
    should_write,
    status_patch,
)
from fleetkeeper.health.gpu import FakeGpuBackend, GpuSample
from fleetkeeper.health.metrics import AgentMetrics

log = logging.getLogger("fleetkeeper.health.agent")


@dataclass
class Checks:
    """The check families of one node; any may be None (not checked)."""

    disk: DiskCheck | None = None
    gpu: GpuCheck | None = None
    network: NetworkCheck | None = None
    maintenance: MaintenanceCheck | None = None

    async def run(self, metrics: AgentMetrics | None = None) -> dict[str, Finding]:
        findings: list[Finding] = []
        for fam, chk in (("disk", self.disk), ("gpu", self.gpu), ("network", self.network),
                         ("maintenance", self.maintenance)):
            if chk is None:
                continue
            t0 = time.perf_counter()
            try:
                res = chk.check()
                if asyncio.iscoroutine(res):
                    res = await res
                findings.extend(res)
            except Exception as exc:  # noqa: BLE001 - one broken family must not hide the others
                log.exception("%s check failed", fam)
                findings.append(Finding({"disk": DISK_UNHEALTHY, "network": NETWORK_UNREACHABLE,
                                         "maintenance": MAINTENANCE}.get(fam, "GPUUnhealthy"),
                                        False, "CheckFailed", f"{fam} check failed: {exc}"[:300]))
            if metrics:
                metrics.check_seconds.labels(fam).observe(time.perf_counter() - t0)
        return merge_findings(findings)


class ConditionWriter:
    """PATCH a node's status conditions (strategic merge by ``type``)."""

    def __init__(self, kube: Kube, *, dry_run: bool = False):
        self.kube = kube
        self.dry_run = dry_run
        self.writes = 0

    async def write(self, node: str, patch: dict) -> None:
        self.writes += 1
        if self.dry_run:
            log.info("dry-run: would patch %s status with %s", node, patch)
            return
        await self.kube.patch(NODES, node, patch, subresource="status", patch_type="strategic")


@dataclass
class NodeAgentState:
    node: str
    state: WriteState
    rng: random.Random


class AgentCore:
    """The write decision of one or many nodes (shared by the real agent and the simulation)."""

    def __init__(self, writer: ConditionWriter, clock: Clock, *, heartbeat: float = 300.0, jitter: float = 0.2,
                 startup_spread: float = 30.0, metrics: AgentMetrics | None = None, seed: int | None = None):
        self.writer = writer
        self.clock = clock
        self.heartbeat = heartbeat
        self.jitter = jitter
        self.startup_spread = startup_spread
        self.metrics = metrics
        self.seed = seed
        self.nodes: dict[str, NodeAgentState] = {}

    def _state(self, node: str) -> NodeAgentState:
        st = self.nodes.get(node)
        if st is None:
            rng = random.Random(f"{self.seed}:{node}" if self.seed is not None else None)
            # first heartbeat of a healthy node: spread over startup_spread, so a rollout does not write in lockstep
            st = NodeAgentState(node, WriteState({}, {}, -1.0, self.clock.now() + rng.uniform(0, self.startup_spread)),
                                rng)
            self.nodes[node] = st
        return st

    def due(self, node: str, current: dict[str, Finding]) -> tuple[str, dict] | None:
        """(why, patch) when ``node``'s conditions must be written now, else None (no I/O)."""
        st = self._state(node)
        now = self.clock.now()
        if st.state.last_write < 0 and not any(f.problem for f in current.values()) and now < st.state.next_heartbeat:
            return None
        write, why = should_write(st.state, current, now)
        if not write:
            return None
        return why, status_patch(st.state, current, now)

    async def observe(self, node: str, current: dict[str, Finding]) -> bool:
        """Write if needed; True when a write happened."""
        pending = self.due(node, current)
        return pending is not None and await self.commit(node, current, *pending)

    async def commit(self, node: str, current: dict[str, Finding], why: str, patch: dict) -> bool:
        """Write what :meth:`due` decided; True when the write happened."""
        st = self._state(node)
        now = self.clock.now()
        try:
            await self.writer.write(node, patch)
        except errors.NotFound:
            log.info("node %s is gone; forgetting it", node)
            self.nodes.pop(node, None)
            return False
        except errors.FleetkeeperError as exc:
            log.warning("could not write conditions of %s: %s (retrying next cycle)", node, exc)
            if self.metrics:
                self.metrics.writes.labels("error").inc()
            return False
        st.state.written = dict(current)
        st.state.last_write = now
        st.state.next_heartbeat = now + heartbeat_delay(self.heartbeat, self.jitter, st.rng)
        if self.metrics:
            self.metrics.writes.labels(why).inc()
        if why == "change":
            problems = [f"{t}={f.reason}" for t, f in sorted(current.items()) if f.problem]
            log.info("node %s conditions changed: %s", node, ", ".join(problems) or "all clear")
        return True


class Agent:
    """One node's agent (the DaemonSet pod)."""

    def __init__(self, node: str, checks: Checks, core: AgentCore, *, interval: float = 30.0):
        self.node = node
        self.checks = checks
        self.core = core
        self.interval = interval
        self.cycles = 0

    async def cycle(self) -> dict[str, Finding]:
        current = await self.checks.run(self.core.metrics)
        # own every type we check, so cleared problems are written as False
        await self.core.observe(self.node, current)
        self.cycles += 1
        return current

    async def run(self) -> None:
        while True:
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the agent alive; the failure is logged
                log.exception("agent cycle failed")
            await self.core.clock.sleep(self.interval)


# --- simulation -------------------------------------------------------------

MAINT_EVENT = {"reboot": "Reboot", "redeploy": "Redeploy", "terminate": "Terminate", "replace": "Terminate"}


def fault_gpus(faults: list[Fault], gpus: int) -> FakeGpuBackend:
    """The GPU state a fault list stands for (GPU 0 carries the fault)."""
    be = FakeGpuBackend.healthy(gpus)
    if not gpus:
        return be
    for f in faults:
        if f.kind == "xid":
            be.set(0, xids=tuple(sorted(set(be.gpus[0].xids) | {int(f.arg)})))
            if int(f.arg) == 79:
                be.set(0, lost=True)
        elif f.kind in ("ecc", "ecc-stuck"):
            be.set(0, ecc_uncorrected_volatile=2)
        elif f.kind == "remap-pending":
            be.set(0, remap_pending=True)
        elif f.kind == "gpu-missing":
            be.remove(gpus - 1)
    return be


def simulated_findings(node: str, faults: list[Fault], gpus: int) -> dict[str, Finding]:
    found: list[Finding] = []
    gpu = GpuCheck(fault_gpus(faults, gpus), expected=gpus)
    lost_xid = any(f.kind == "xid" and f.arg == "79" for f in faults)
    for f in gpu.check():
        # a GPU that fell off the bus still reports its Xid through the kernel log
        found.append(f)
    if lost_xid and not any(f.type == "GPUXidError" and f.problem for f in found):
        found.append(Finding("GPUXidError", True, "Xid79", "Xid 79 on GPU 0 (GPU has fallen off the bus)"))
    disk = {"disk-full": ("DiskFull", "/var/lib/kubelet is 99.0% full (threshold 95%)"),
            "disk-ro": ("ReadOnlyFilesystem", "/var/lib/kubelet is on /dev/nvme0n1 mounted read-only"),
            "disk-io": ("IOErrors", "kernel I/O errors on nvme0n1: blk_update_request: I/O error, dev nvme0n1")}
    found.append(Finding.ok(DISK_UNHEALTHY))
    for f in faults:
        if f.kind in disk:
            found.append(Finding(DISK_UNHEALTHY, True, *disk[f.kind]))
    found.append(Finding.ok(NETWORK_UNREACHABLE, "3/3 targets reachable"))
    if any(f.kind == "net-down" for f in faults):
        found.append(Finding(NETWORK_UNREACHABLE, True, "TargetsUnreachable",
                             "3/3 targets unreachable: apiserver:443, gateway (icmp), peer:22"))
    events = [{"EventId": f"sim-{node}-{f.arg}", "EventStatus": "Scheduled", "EventType": MAINT_EVENT[f.arg],
               "ResourceType": "VirtualMachine", "Resources": [node], "NotBefore": "", "EventSource": "Platform",
               "Description": "simulated host maintenance"} for f in faults if f.kind == "maintenance"]
    found.append(parse_azure({"DocumentIncarnation": len(events), "Events": events}, node))
    out = merge_findings(found)
    return {t: out[t] for t in AGENT_TYPES if t in out}


# what a simulated node-local action clears (ecc-stuck survives all of them)
SIM_CLEARS = {"reset": {"xid", "ecc", "remap-pending"},
              "reboot": {"xid", "ecc", "remap-pending", "disk-ro", "net-down"},
              "wait-maintenance": {"maintenance"}}


@dataclass
class SimulatedActions:
    """The simulation's node-local actuator: performs a reset/reboot/maintenance wait by clearing the
    faults that action fixes from the fault plan (``ecc-stuck`` is never cleared)."""

    plan: FaultPlan
    performed: list[tuple[str, str]] = field(default_factory=list)  # (node, action)

    async def perform(self, req) -> str:  # req: health.actions.Request
        clears = SIM_CLEARS.get(req.action)
        if clears is None:
            raise ValueError(f"unknown action {req.action!r}")
        gone = self.plan.remove(req.node, lambda f: f.kind not in clears)
        self.performed.append((req.node, req.action))
        return f"simulated {req.action}: cleared {', '.join(map(str, gone)) or 'nothing'}"


@dataclass
class SimulatedFleet:
    """Agents of every simulated node in one process, reading the fault plan."""

    core: AgentCore
    plan: FaultPlan
    nodes: Callable[[], list[tuple[str, int]]]  # (name, gpus) of the nodes to simulate
    interval: float = 2.0
    concurrency: int = 32  # condition writes in flight at once
    cycles: int = 0
    last_error: str = field(default="")
    # node-local actions: (name, uid, annotations) of simulated nodes, and the agent side of the protocol
    requests: Callable[[], list[tuple[str, str, dict[str, str]]]] | None = None
    actor: object | None = None  # health.actions.ActionAgent

    async def act(self) -> None:
        if self.requests is None or self.actor is None:
            return
        for name, uid, ann in self.requests():
            try:
                await self.actor.handle(name, uid, ann)  # type: ignore[attr-defined]
            except errors.FleetkeeperError as exc:
                log.warning("simulated action on %s: %s", name, exc)

    async def cycle(self) -> int:
        await self.act()
        try:
            plan = self.plan.read()
            self.last_error = ""
        except errors.ConfigError as exc:  # a broken fault file: keep the last state, say so once
            if str(exc) != self.last_error:
                log.error("fault plan unreadable, keeping the last conditions: %s", exc)
            self.last_error = str(exc)
            return 0
        # Decide every node first, then write concurrently, as independent agents would: one write at a time
        # made a fault wait behind every heartbeat due before it in the cycle (at 7,500 nodes, tens of seconds).
        due = []
        for name, gpus in self.nodes():
            current = simulated_findings(name, plan.get(name, []), gpus)
            pending = self.core.due(name, current)
            if pending is not None:
                due.append((name, current, pending))
        # changes and faults before plain heartbeats (a fault on a node not yet written is a "first" write)
        due.sort(key=lambda d: not (d[2][0] == "change" or any(f.problem for f in d[1].values())))
        limit = asyncio.Semaphore(self.concurrency)

        async def write(name: str, current: dict[str, Finding], pending: tuple[str, dict]) -> bool:
            async with limit:
                return await self.core.commit(name, current, *pending)
        writes = sum(await asyncio.gather(*(write(*d) for d in due)))
        known = {n for n, _ in self.nodes()}
        for gone in [n for n in self.core.nodes if n not in known]:
            self.core.nodes.pop(gone, None)
        self.cycles += 1
        return writes

    async def run(self) -> None:
        while True:
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("simulated agents cycle failed")
            await self.core.clock.sleep(self.interval)


def agent_clock() -> Clock:
    return RealClock()
