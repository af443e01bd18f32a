"""One place that acts on machines: the provider, the durable ledger, Events,
metrics and dry-run together. A caller (the remediation controller, the
lifecycle applier) asks ``act(action, node)`` and gets a :class:`Step` back;
asking again is always safe.

terminate / replace:

1. read the live Node (its providerID and uid: the machine);
2. the ledger says whether this machine was already acted on (never twice),
   or whether the hourly/daily limit is reached;
3. record ``started``, call the provider, record ``done``; Event + metric;
4. afterwards, when the provider can tell that the machine is gone and the
   platform does not delete the Node itself, delete the Node (UID
   precondition); never before the machine is gone.

Provider errors become Events (``MachineActionFailed`` with the reason:
not found, throttled, forbidden, unsupported) and a retry after the error's
delay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock
from fleetkeeper.core.events import EventRecorder, node_ref
from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.machines.base import Machine, MachineProvider
from fleetkeeper.machines.config import MachinesConfig
from fleetkeeper.machines.ledger import Entry, Ledger

log = logging.getLogger("fleetkeeper.machines")


class MachineMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.actions = Counter("fleetkeeper_machine_actions_total",
                               "Machine actions by provider, action and result "
                               "(success, dry_run, limited, already_done, error, unsupported)",
                               ["provider", "action", "result"], registry=registry)
        self.node_deletes = Counter("fleetkeeper_machine_node_deletes_total",
                                    "Node objects deleted after their machine was gone", ["provider"],
                                    registry=registry)


@dataclass(frozen=True)
class Step:
    kind: str  # acted | waiting | gone | limited | dry_run | refused
    message: str
    requeue_after: float | None = None
    fresh: bool = False  # the provider acted in this call (not in an earlier one)


class MachineActuator:
    def __init__(self, kube: Kube, provider: MachineProvider, cfg: MachinesConfig, recorder: EventRecorder,
                 clock: Clock, registry: CollectorRegistry, namespace: str):
        self.kube = kube
        self.provider = provider
        self.cfg = cfg
        self.recorder = recorder
        self.clock = clock
        self.metrics = MachineMetrics(registry)
        self.ledger = Ledger(kube, namespace, clock)
        self._dry_noted: set[tuple[str, str]] = set()

    def _count(self, action: str, result: str) -> None:
        self.metrics.actions.labels(self.provider.name, action, result).inc()

    async def _event(self, m: Machine, reason: str, note: str, warn: bool = True, id: str = "") -> None:
        await self.recorder.emit(node_ref(m.node, m.node_uid), reason, note[:1000],
                                 type_="Warning" if warn else "Normal", id=id)

    async def _done_event(self, action: str, m: Machine, entry: Entry, message: str) -> None:
        """The action's outcome, identified by its ledger entry: announced when it finishes and again by a
        process that finds it done in the ledger (the first may have died with a process killed in between),
        one Event either way (``core.events``)."""
        await self._event(m, f"Machine{action.capitalize()}Started" if action != "reboot" else "MachineRebooted",
                          message, warn=False, id=f"{action}-done@{int(entry.at)}")

    async def act(self, action: str, node: str, why: str, *, dry_run: bool = False, uid: str = "",
                  max_per_hour: int | None = None, reason: str = "", announce: bool = True) -> Step:
        """Act on the machine of ``node`` (``uid``: only while it is that Node). ``max_per_hour``: a caller's
        own limit; the smaller of it and the configuration's applies."""
        try:
            obj = await self.kube.get(NODES, node)
        except errors.NotFound:
            return Step("gone", f"node {node} is gone")
        m = Machine.from_node(obj)
        if uid and m.node_uid != uid:
            return Step("gone", f"node {node} is a new Node (uid {m.node_uid}, not {uid})")
        if action not in self.provider.actions:
            self._count(action, "unsupported")
            await self._event(m, "MachineActionUnsupported", f"{why}: the {self.provider.name} provider cannot "
                                                             f"{action} machines")
            return Step("refused", f"{self.provider.name} cannot {action}")
        if dry_run:
            return await self._dry(action, m, why)
        v = await self.ledger.start(m.key, m.node_uid, m.node, action, self.provider.name,
                                    max_per_hour=min(self.cfg.max_per_hour, max_per_hour if max_per_hour is not None
                                                     else self.cfg.max_per_hour),
                                    max_per_day=self.cfg.max_per_day)
        if v.kind == "limited":
            self._count(action, "limited")
            await self._event(m, "MachineActionRateLimited", f"{why}: {action} of {m.key} waits: {v.why}")
            return Step("limited", v.why, 60.0)
        if v.kind == "done":
            if v.entry is not None and not v.entry.message.startswith("not found") and \
                    not v.entry.message.startswith("outcome unknown"):
                await self._done_event(action, m, v.entry, v.entry.message)
            return await self._after(action, m)
        if v.kind == "resume" and action == "reboot":
            # asked before a restart, answer unknown: a second reboot would be a second action
            assert v.entry is not None
            await self.ledger.finish(v.entry, "done", "outcome unknown (controller restarted)")
            return Step("acted", "reboot was requested before a restart; not repeated")
        entry = v.entry
        assert entry is not None
        if v.kind in ("new", "resume") and announce:  # resumed: its announcement may have died with a process
            await self._event(m, reason or f"Machine{action.capitalize()}",
                              f"{why}: {action} {m.key} through the {self.provider.name} provider",
                              id=f"{action}@{int(entry.at)}")
        try:
            out = await getattr(self.provider, action)(m)
        except errors.MachineUnsupported as exc:
            await self.ledger.finish(entry, "failed", str(exc))
            self._count(action, "unsupported")
            await self._event(m, "MachineActionUnsupported", f"{why}: {exc}")
            return Step("refused", str(exc))
        except errors.MachineNotFound as exc:
            # terminate/replace of a machine that is not there: done (the Node is all that is left)
            if action == "reboot":
                await self.ledger.finish(entry, "failed", str(exc))
                self._count(action, "error")
                await self._event(m, "MachineActionFailed", f"{why}: {action}: not found: {exc}")
                raise
            await self.ledger.finish(entry, "done", f"not found: {exc}")
            self._count(action, "success")
            return replace(await self._after(action, m, gone=True), fresh=True)
        except errors.MachineError as exc:
            await self.ledger.finish(entry, "failed", str(exc))
            self._count(action, "error")
            kind = {errors.MachineThrottled: "throttled", errors.MachineForbidden: "forbidden"}.get(type(exc), "failed")
            await self._event(m, "MachineActionFailed", f"{why}: {action} {kind}, retrying in "
                                                        f"{getattr(exc, 'delay', 60.0):.0f}s: {exc}")
            raise
        await self.ledger.finish(entry, "done", out.message)
        self._count(action, "success")
        log.info("%s %s (%s): %s", action, m.node, m.key, out.message)
        await self._done_event(action, m, entry, out.message)
        if action == "reboot":
            return Step("acted", out.message, fresh=True)
        return replace(await self._after(action, m, gone=out.gone), fresh=True)

    async def _dry(self, action: str, m: Machine, why: str) -> Step:
        try:
            out = await getattr(self.provider, action)(m, dry_run=True)
            msg = out.message
        except errors.MachineError as exc:
            msg = f"would fail: {exc}"
        if (m.node_uid, action) not in self._dry_noted:
            self._dry_noted.add((m.node_uid, action))
            self._count(action, "dry_run")
            await self._event(m, f"DryRunMachine{action.capitalize()}", f"{why}: {msg}", warn=False)
        return Step("dry_run", msg)

    async def _after(self, action: str, m: Machine, gone: bool | None = None) -> Step:
        """The machine was acted on: delete the Node once the machine is gone, unless the platform does."""
        if action == "reboot":
            return Step("acted", "reboot already done")
        if self.provider.deletes_node:
            return Step("waiting", f"{m.key}: {self.provider.name} deletes the Node when the machine is gone", 30.0)
        if gone is None or gone is False:
            try:
                there = await self.provider.exists(m)
            except errors.MachineError as exc:
                log.info("cannot tell whether %s is gone yet: %s", m.key, exc)
                return Step("waiting", f"cannot tell whether {m.key} is gone: {exc}", 30.0)
            if there is None:
                return Step("waiting", f"{self.provider.name} cannot tell whether {m.key} is gone; the Node is left "
                                       "to the platform", 300.0)
            if there:
                return Step("waiting", f"{m.key} still there", 15.0)
        try:
            await self.kube.delete(NODES, m.node, preconditions={"uid": m.node_uid} if m.node_uid else None)
        except (errors.NotFound, errors.Conflict):
            return Step("gone", "node already gone")
        self.metrics.node_deletes.labels(self.provider.name).inc()
        await self._event(m, "NodeDeleted", f"{m.key} is gone; deleted its Node object", warn=False)
        return Step("gone", f"{m.key} gone; Node deleted")


async def from_cluster(kube: Kube, recorder: EventRecorder, clock: Clock, registry: CollectorRegistry,
                       namespace: str, provider: str | None = None) -> MachineActuator:
    """The configured actuator: ConfigMap ``fleetkeeper-machines`` (key ``machines.yaml``) in ``namespace``,
    with ``provider`` (``--machine-provider``) winning over its ``provider``."""
    from fleetkeeper.core.kube import CONFIGMAPS
    from fleetkeeper.machines.config import CONFIGMAP, CONFIGMAP_KEY, build_provider, load_config

    cm = await kube.get_or_none(CONFIGMAPS, CONFIGMAP, namespace)
    text = ((cm or {}).get("data") or {}).get(CONFIGMAP_KEY)
    cfg = load_config(text, f"configmap {namespace}/{CONFIGMAP} key {CONFIGMAP_KEY}", provider=provider)
    prov = await build_provider(cfg, kube)
    log.info("machine provider: %s", prov.name)
    return MachineActuator(kube, prov, cfg, recorder, clock, registry, namespace)


class MachinesProvider:
    """The machine provider the core applier calls (``terminate(node, dry_run=)``, ``replace``,
    ``reboot``), with every call going through a :class:`MachineActuator` (ledger, limits, Events,
    node deletion once the machine is gone). Built from the configuration on first use, or at start
    with :meth:`ensure` (so a bad configuration is reported at once)."""

    def __init__(self, loader: Callable[[], Awaitable[MachineActuator]] | None = None,
                 actuator: MachineActuator | None = None):
        if loader is None and actuator is None:
            raise ValueError("a loader or an actuator")
        self._loader = loader
        self.actuator = actuator
        self._loading: asyncio.Lock | None = None

    @property
    def name(self) -> str:
        return self.actuator.provider.name if self.actuator is not None else "configured"

    async def ensure(self) -> MachineActuator:
        """The actuator, built once: concurrent first calls (several workers retiring nodes at once) wait
        for the one build instead of each building one (a second would register its metrics twice and
        fail after the caller had already recorded its request on the node)."""
        if self.actuator is None:
            assert self._loader is not None
            if self._loading is None:
                self._loading = asyncio.Lock()
            async with self._loading:
                if self.actuator is None:
                    self.actuator = await self._loader()
        return self.actuator

    async def _do(self, verb: str, node: str, dry_run: bool) -> str:
        act = await self.ensure()
        step = await act.act(verb, node, f"{verb} requested", dry_run=dry_run, announce=False)
        if step.kind == "limited":
            raise errors.Temporary(step.message, step.requeue_after or 60.0)
        if step.kind == "refused":
            raise errors.Terminal(step.message)
        return step.message

    async def terminate(self, node: str, *, dry_run: bool = False) -> str:
        return await self._do("terminate", node, dry_run)

    async def replace(self, node: str, *, dry_run: bool = False) -> str:
        return await self._do("replace", node, dry_run)

    async def reboot(self, node: str, *, dry_run: bool = False) -> str:
        return await self._do("reboot", node, dry_run)
