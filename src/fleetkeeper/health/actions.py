"""Node-local actions: a GPU reset, a node reboot, or waiting for the
platform's maintenance, performed by the node's own agent.

The protocol lives on the Node (two annotations), so it survives restarts of
either side:

* the controller, only after the node is drained, writes
  ``<domain>/action-request`` = ``{"action", "nonce", "node", "uid", "gpu",
  "at", "deadline"}``;
* the agent acts only on a request naming its own node *and* uid (a new Node
  of the same name never inherits a request), only once per nonce (the nonce
  is recorded on the host before acting, so a reboot or an agent restart
  never repeats it), and reports ``<domain>/action-result`` =
  ``{"nonce", "outcome": succeeded|failed, "message", "at"}``;
* :func:`local_step` (pure) tells the controller what is next: request,
  wait, or escalate to replace when the action failed, never reported back,
  or did not clear the fault by the deadline.

Backends: :class:`HostActions` (``nvidia-smi`` for the reset, after NVML
says the GPUs are idle; a host reboot command; the maintenance check), and
the simulation's (clears the fault plan's faults, except ``ecc-stuck``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.health.actionproto import LOCAL_ACTIONS, ActionKeys, LocalStep, Report, Request, local_step, new_request
from fleetkeeper.health.gpu import GpuBackend
from fleetkeeper.health.metrics import AgentMetrics

__all__ = ["LOCAL_ACTIONS", "ActionKeys", "LocalStep", "Report", "Request", "local_step", "new_request",
           "ActionAgent", "DoneLog", "HostActions", "watch_own_node"]

log = logging.getLogger("fleetkeeper.health.actions")

# --- the agent's side ------------------------------------------------------------------

class ActionBackend(Protocol):
    async def perform(self, req: Request) -> str:
        """Do it; a message on success; raise on failure."""
        ...


Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


async def run_command(argv: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()[-300:]


class HostActions:
    """The real node. GPU reset: ``nvidia-smi --gpu-reset [-i N]`` once the GPU backend (NVML) says
    the GPUs are there; the reset itself refuses a GPU with processes on it (the node is drained,
    but a leftover process fails the action, which then escalates). Reboot: ``reboot_cmd`` (default
    ``nsenter -t 1 -m -u -i -n -- systemctl reboot``, the host's init, from a privileged pod with
    hostPID). wait-maintenance: succeeds when ``maintenance_clear()`` says the platform's event is over."""

    reboots_host = True  # a reboot is reported by the agent that starts after it

    def __init__(self, gpus: GpuBackend, *, runner: Runner = run_command, nvidia_smi: str = "nvidia-smi",
                 reboot_cmd: tuple[str, ...] = ("nsenter", "-t", "1", "-m", "-u", "-i", "-n", "--",
                                                "systemctl", "reboot"),
                 maintenance_clear: Callable[[], Awaitable[bool]] | None = None):
        self.gpus = gpus
        self.runner = runner
        self.nvidia_smi = nvidia_smi
        self.reboot_cmd = list(reboot_cmd)
        self.maintenance_clear = maintenance_clear

    async def perform(self, req: Request) -> str:
        if req.action == "reset":
            seen = self.gpus.sample()
            targets = [g for g in seen if req.gpu in ("all", str(g.index))]
            if not targets:
                raise errors.Terminal(f"GPU {req.gpu} not found (saw {len(seen)} GPU(s))")
            argv = [self.nvidia_smi, "--gpu-reset"] + ([] if req.gpu == "all" else ["-i", req.gpu])
            rc, out = await self.runner(argv)
            if rc != 0:
                raise errors.Terminal(f"{' '.join(argv)} exited {rc}: {out}")
            return f"reset {len(targets)} GPU(s): {out[-120:]}"
        if req.action == "reboot":
            rc, out = await self.runner(self.reboot_cmd)
            if rc != 0:
                raise errors.Terminal(f"{' '.join(self.reboot_cmd)} exited {rc}: {out}")
            return "reboot started"
        if req.action == "wait-maintenance":
            if self.maintenance_clear is None:
                raise errors.Terminal("no maintenance source configured (--cloud)")
            while not await self.maintenance_clear():
                await asyncio.sleep(30)
            return "platform maintenance finished"
        raise errors.Terminal(f"unknown action {req.action!r}")


class DoneLog:
    """Nonces this host already started (a file on the host, so neither an agent restart nor a reboot
    repeats an action): the boot id they started under, and their report once there is one."""

    def __init__(self, path: Path | None, boot_id: Path = Path("/proc/sys/kernel/random/boot_id")):
        self.path = path
        self.boot_id_path = boot_id
        self._mem: dict[str, dict] = {}

    def boot_id(self) -> str:
        try:
            return self.boot_id_path.read_text().strip()
        except OSError:
            return ""

    def _load(self) -> dict[str, dict]:
        if self.path is None:
            return self._mem
        try:
            return {k: dict(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def get(self, nonce: str) -> dict | None:
        """``{"boot": boot id at the start, "report": {...} or None}``, or None if never started."""
        return self._load().get(nonce)

    def record(self, nonce: str, report: "Report | None" = None) -> None:
        d = self._load()
        prev = d.get(nonce) or {"boot": self.boot_id()}
        d[nonce] = {**prev, "report": report.__dict__ if report else None}
        d = dict(list(d.items())[-50:])
        if self.path is None:
            self._mem = d
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(d))
        tmp.replace(self.path)


class ActionAgent:
    """One node's side of the protocol: given the node's annotations (from its own watch, or the
    simulation's informer), perform a fenced request once and report."""

    def __init__(self, kube: Kube, names: Names, backend: ActionBackend, done: DoneLog, clock_now: Callable[[], float],
                 *, dry_run: bool = False, metrics: AgentMetrics | None = None):
        self.kube = kube
        self.metrics = metrics
        self.keys = ActionKeys(names)
        self.backend = backend
        self.done = done
        self.now = clock_now
        self.dry_run = dry_run
        self.performed = 0

    async def handle(self, node: str, uid: str, annotations: dict[str, str]) -> Report | None:
        req = Request.loads(annotations.get(self.keys.request))
        if req is None:
            return None
        if req.node != node or req.uid != uid:
            log.warning("ignoring an action request for %s/%s on node %s/%s", req.node, req.uid, node, uid)
            return None
        rep = Report.loads(annotations.get(self.keys.result))
        if rep is not None and rep.nonce == req.nonce:
            return None  # already reported
        started = self.done.get(req.nonce)
        if started is not None:
            # started before (an agent restart, a reboot, or a watch event older than our report): never again
            if started.get("report"):
                report = Report(**started["report"])  # say it again: the same report
            elif req.action == "reboot" and started.get("boot") != self.done.boot_id():
                report = Report(req.nonce, "succeeded", "rebooted (new boot id)", self.now())
            elif req.action == "reboot":
                return None  # the reboot is still coming
            else:
                report = Report(req.nonce, "failed", f"{req.action} interrupted (agent restarted)", self.now())
                self._count(req.action, "interrupted")
            self.done.record(req.nonce, report)
            await self._report(node, report)
            return report
        if self.dry_run:
            log.info("dry-run: would %s on %s (nonce %s)", req.action, node, req.nonce)
            self._count(req.action, "dry-run")
            return None
        self.done.record(req.nonce)
        self.performed += 1
        log.warning("performing %s on %s (nonce %s)", req.action, node, req.nonce)
        try:
            msg = await self.backend.perform(req)
            report = Report(req.nonce, "succeeded", msg, self.now())
        except Exception as exc:  # noqa: BLE001 - any failure is reported, never retried here
            report = Report(req.nonce, "failed", f"{type(exc).__name__}: {exc}"[:300], self.now())
        self._count(req.action, report.outcome)
        if req.action == "reboot" and report.outcome == "succeeded" and getattr(self.backend, "reboots_host", False):
            return report  # reported after the boot (a new boot id), by the restarted agent
        self.done.record(req.nonce, report)
        await self._report(node, report)
        return report

    def _count(self, action: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.node_actions.labels(action, outcome).inc()

    async def _report(self, node: str, report: Report) -> None:
        try:
            await self.kube.patch(NODES, node, {"metadata": {"annotations": {self.keys.result: report.dumps()}}})
        except errors.NotFound:
            return
        log.info("%s: action %s %s: %s", node, report.nonce, report.outcome, report.message)


async def watch_own_node(kube: Kube, node: str, on_node: Callable[[dict], Awaitable[None]],
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """List + watch this node only (field selector): the request arrives within a watch event."""
    sel = f"metadata.name={node}"
    while True:
        try:
            items, rv = await kube.list(NODES, field_selector=sel)
            for obj in items:
                await on_node(obj)
            async for typ, obj in kube.watch(NODES, rv, field_selector=sel, timeout_seconds=300):
                if typ in ("ADDED", "MODIFIED"):
                    await on_node(obj)
        except asyncio.CancelledError:
            raise
        except errors.FleetkeeperError as exc:
            log.info("watch of node %s: %s; again shortly", node, exc)
            await sleep(5.0)
