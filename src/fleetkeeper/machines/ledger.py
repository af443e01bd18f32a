"""The machine-action ledger: every terminate/replace/reboot fleetkeeper starts,
kept in the cluster (ConfigMap ``fleetkeeper-machine-actions``), never only in
memory.

An entry is written *before* the provider is called (state ``started``) and
marked ``done`` after it answered, each write guarded by the ConfigMap's
resourceVersion, so two replicas or a restarted controller agree on what was
done:

* an entry ``done`` for (machine, node uid, action) means: never again;
* an entry ``started`` means a controller stopped between asking the provider
  and recording its answer: idempotent verbs (terminate, replace) are asked
  again (the same action completing), a reboot is not;
* the hourly and daily limits count entries, so a restart gets no fresh
  budget.

:func:`decide_start` is the pure part (entries in, verdict out).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock
from fleetkeeper.core.kube import CONFIGMAPS, Kube

log = logging.getLogger("fleetkeeper.machines")

LEDGER_CONFIGMAP = "fleetkeeper-machine-actions"
KEY = "actions"
RETENTION = 14 * 86400.0
MAX_ENTRIES = 3000


@dataclass
class Entry:
    machine: str  # Machine.key: the providerID, or node-uid://...
    uid: str  # the Node's uid
    node: str
    action: str
    at: float
    state: str  # started | done
    provider: str = ""
    message: str = ""


@dataclass(frozen=True)
class Verdict:
    kind: str  # new | resume | done | limited
    entry: Entry | None = None
    why: str = ""


def counted(entries: list[Entry], now: float, window: float) -> int:
    return sum(1 for e in entries if now - e.at < window)


def decide_start(entries: list[Entry], machine: str, uid: str, action: str, now: float, *, max_per_hour: int,
                 max_per_day: int) -> Verdict:
    for e in entries:
        if e.machine == machine and e.uid == uid and (e.action == action or
                                                      {e.action, action} <= {"terminate", "replace"}):
            return Verdict("done" if e.state == "done" else "resume", e)
    hour, day = counted(entries, now, 3600.0), counted(entries, now, 86400.0)
    if hour >= max_per_hour:
        return Verdict("limited", why=f"{hour} machine actions within the hour (max_per_hour {max_per_hour})")
    if day >= max_per_day:
        return Verdict("limited", why=f"{day} machine actions within the day (max_per_day {max_per_day})")
    return Verdict("new")


def parse(data: dict[str, str] | None) -> list[Entry]:
    """Entries of the ConfigMap's data; an unreadable ledger is an error, never an empty one (an
    empty one would allow acting twice)."""
    raw = (data or {}).get(KEY) or "[]"
    try:
        items = json.loads(raw)
        return [Entry(**x) for x in items]
    except (ValueError, TypeError) as exc:
        raise errors.Terminal(f"configmap {LEDGER_CONFIGMAP} key {KEY} is unreadable ({exc}); "
                              "refusing machine actions until it is fixed or removed") from None


def render(entries: list[Entry], now: float) -> str:
    keep = [e for e in entries if now - e.at < RETENTION][-MAX_ENTRIES:]
    return json.dumps([asdict(e) for e in keep], separators=(",", ":"))


class Ledger:
    def __init__(self, kube: Kube, namespace: str, clock: Clock):
        self.kube = kube
        self.namespace = namespace
        self.clock = clock

    async def read(self) -> tuple[list[Entry], str | None]:
        cm = await self.kube.get_or_none(CONFIGMAPS, LEDGER_CONFIGMAP, self.namespace)
        if cm is None:
            return [], None
        return parse(cm.get("data")), cm["metadata"]["resourceVersion"]

    async def _write(self, entries: list[Entry], rv: str | None) -> None:
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": LEDGER_CONFIGMAP, "namespace": self.namespace},
                "data": {KEY: render(entries, self.clock.now())}}
        if rv is None:
            await self.kube.create(CONFIGMAPS, body, self.namespace)
        else:
            body["metadata"]["resourceVersion"] = rv
            await self.kube.replace(CONFIGMAPS, LEDGER_CONFIGMAP, body, self.namespace)

    async def start(self, machine: str, uid: str, node: str, action: str, provider: str, *, max_per_hour: int,
                    max_per_day: int) -> Verdict:
        """Record a new action (``new``), or say why not (``done``, ``resume``, ``limited``).
        Compare-and-swap on the ConfigMap: a concurrent writer makes this re-read and decide again."""
        for _ in range(10):
            entries, rv = await self.read()
            now = self.clock.now()
            v = decide_start(entries, machine, uid, action, now, max_per_hour=max_per_hour, max_per_day=max_per_day)
            if v.kind != "new":
                return v
            e = Entry(machine, uid, node, action, now, "started", provider)
            try:
                await self._write(entries + [e], rv)
            except errors.Conflict:  # also AlreadyExists
                continue
            return Verdict("new", e)
        raise errors.Temporary(f"configmap {LEDGER_CONFIGMAP}: too many concurrent writers", 1.0)

    async def finish(self, e: Entry, state: str, message: str) -> None:
        """Mark an entry ``done`` (or drop it: state ``failed`` means the provider refused, nothing happened)."""
        for _ in range(10):
            entries, rv = await self.read()
            rest = [x for x in entries if not (x.machine == e.machine and x.uid == e.uid and x.action == e.action)]
            if state != "failed":
                rest.append(Entry(e.machine, e.uid, e.node, e.action, e.at, state, e.provider, message[:200]))
            try:
                await self._write(rest, rv)
            except errors.Conflict:
                continue
            return
        raise errors.Temporary(f"configmap {LEDGER_CONFIGMAP}: too many concurrent writers", 1.0)
