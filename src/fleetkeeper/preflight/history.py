"""Per-GPU result history, keyed by GPU UUID so it follows the hardware from
node to node. Sharded over a few ConfigMaps (a GPU's shard is a hash of its
UUID) and written in batches: at most one write per shard per flush, with a
resourceVersion precondition (a conflict re-reads and retries next flush)."""

from __future__ import annotations

import hashlib
import json
import logging

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock
from fleetkeeper.core.kube import CONFIGMAPS, Kube

log = logging.getLogger("fleetkeeper.preflight.history")
PREFIX = "fleetkeeper-preflight-gpus"
LABEL = "fleetkeeper.io/preflight-history"


def shard_of(uuid: str, shards: int) -> str:
    return f"{PREFIX}-{int(hashlib.sha256(uuid.encode()).hexdigest()[:8], 16) % shards:02x}"


def merge(data: dict[str, str], pending: dict[str, list[dict]], keep: int) -> dict[str, str]:
    """Pure: append pending entries to each GPU's bounded list."""
    out = dict(data)
    for uuid, entries in pending.items():
        try:
            hist = json.loads(out.get(uuid) or "[]")
        except ValueError:
            hist = []
        hist.extend(entries)
        out[uuid] = json.dumps(hist[-keep:], separators=(",", ":"))
    return out


class GpuHistory:
    def __init__(self, kube: Kube, namespace: str, shards: int, keep: int, clock: Clock, metrics=None,
                 dry_run: bool = False, interval: float = 2.0):
        self.kube, self.namespace, self.shards, self.keep = kube, namespace, shards, keep
        self.clock, self.metrics, self.dry_run, self.interval = clock, metrics, dry_run, interval
        self._pending: dict[str, dict[str, list[dict]]] = {}

    def add(self, uuid: str, entry: dict) -> None:
        self._pending.setdefault(shard_of(uuid, self.shards), {}).setdefault(uuid, []).append(entry)

    def _count(self, result: str) -> None:
        if self.metrics:
            self.metrics.history_writes.labels(result).inc()

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for shard, entries in pending.items():
            if self.dry_run:
                continue
            try:
                cm = await self.kube.get_or_none(CONFIGMAPS, shard, self.namespace)
                if cm is None:
                    body = {"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": shard, "namespace": self.namespace, "labels": {LABEL: "true"}},
                            "data": merge({}, entries, self.keep)}
                    await self.kube.create(CONFIGMAPS, body, self.namespace)
                else:
                    cm["data"] = merge(cm.get("data") or {}, entries, self.keep)
                    await self.kube.replace(CONFIGMAPS, shard, cm, self.namespace)
                self._count("ok")
            except errors.Conflict:
                self._count("conflict")
                for u, es in entries.items():  # keep them for the next flush
                    self._pending.setdefault(shard, {}).setdefault(u, [])[:0] = es
            except errors.FleetkeeperError as exc:
                self._count("error")
                log.warning("GPU history shard %s not written: %s; retrying", shard, exc)
                for u, es in entries.items():
                    self._pending.setdefault(shard, {}).setdefault(u, [])[:0] = es

    async def run(self) -> None:
        while True:
            await self.clock.sleep(self.interval)
            await self.flush()


async def read(kube: Kube, uuids: list[str]) -> dict[str, list[dict]]:
    """History of these GPUs from every namespace's shards (for explain)."""
    cms, _ = await kube.list(CONFIGMAPS, label_selector=f"{LABEL}=true")
    out: dict[str, list[dict]] = {}
    for cm in cms:
        data = cm.get("data") or {}
        for u in uuids:
            if u in data:
                try:
                    out.setdefault(u, []).extend(json.loads(data[u]))
                except ValueError:
                    pass
    return out
