"""The fault plan of simulated nodes (local control plane only).

``fleetkeeper fault inject NODE KIND`` writes here; the simulated node agents
(health) and the simulated validation pods (preflight) read it. It is a JSON
file, so the CLI, the demo and the controllers can share it across processes
without any of them talking to the API server for it.

Kinds (``parse_fault`` validates them):
  xid:<code>            a GPU Xid error (e.g. xid:79 fallen off the bus, xid:48 double-bit ECC)
  ecc                   uncorrectable ECC errors on a GPU
  ecc-stuck             the same, and a GPU reset or a reboot does not clear it
  remap-pending         pending row remapping
  gpu-missing           fewer GPUs visible than expected
  disk-full / disk-ro / disk-io
  net-down              network reachability lost
  maintenance:<what>    cloud maintenance event: reboot | redeploy | terminate | replace
  validation:<check>    the active validation suite fails <check> (e.g. validation:nccl)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fleetkeeper.core.errors import ConfigError

# ecc-stuck: an uncorrectable ECC error that a GPU reset or a reboot does not clear (the simulated
# actuator clears every other GPU fault)
_SIMPLE = {"ecc", "ecc-stuck", "remap-pending", "gpu-missing", "disk-full", "disk-ro", "disk-io", "net-down"}
_MAINT = {"reboot", "redeploy", "terminate", "replace"}
_PATTERN = re.compile(r"^(xid:\d{1,3}|maintenance:[a-z]+|validation:[a-z0-9-]+|[a-z-]+)$")


@dataclass(frozen=True)
class Fault:
    kind: str  # xid, ecc, ..., maintenance, validation
    arg: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_fault(text: str) -> Fault:
    t = text.strip().lower()
    if not _PATTERN.match(t):
        raise ConfigError("fault", [("kind", text, "expected xid:<code>, ecc, remap-pending, gpu-missing, disk-full, "
                                                   "disk-ro, disk-io, net-down, maintenance:<reboot|redeploy|"
                                                   "terminate|replace> or validation:<check>")])
    if ":" in t:
        kind, arg = t.split(":", 1)
        if kind == "maintenance" and arg not in _MAINT:
            raise ConfigError("fault", [("kind", text, f"maintenance must be one of {sorted(_MAINT)}")])
        if kind not in ("xid", "maintenance", "validation"):
            raise ConfigError("fault", [("kind", text, "unknown fault kind")])
        return Fault(kind, arg)
    if t not in _SIMPLE:
        raise ConfigError("fault", [("kind", text, f"unknown fault kind; simple kinds are {sorted(_SIMPLE)}")])
    return Fault(t)


class FaultPlan:
    """A JSON file {node: [fault, ...]} with atomic, locked updates."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def _lock(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def read(self) -> dict[str, list[Fault]]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise ConfigError(str(self.path), [("", "", f"not valid JSON: {exc}")]) from None
        return {node: [parse_fault(f) for f in faults] for node, faults in raw.items()}

    def faults(self, node: str) -> list[Fault]:
        return self.read().get(node, [])

    def _write(self, plan: dict[str, list[Fault]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: [str(f) for f in fs] for n, fs in sorted(plan.items()) if fs}, indent=1))
        tmp.replace(self.path)

    def inject(self, node: str, fault: Fault) -> None:
        fd = self._lock()
        try:
            plan = self.read()
            if fault not in plan.setdefault(node, []):
                plan[node].append(fault)
            self._write(plan)
        finally:
            os.close(fd)

    def remove(self, node: str, keep) -> list[Fault]:
        """Drop the node's faults for which ``keep(fault)`` is false; returns the dropped ones."""
        fd = self._lock()
        try:
            plan = self.read()
            faults = plan.get(node, [])
            plan[node] = [f for f in faults if keep(f)]
            self._write(plan)
            return [f for f in faults if not keep(f)]
        finally:
            os.close(fd)

    def clear(self, node: str | None = None) -> None:
        fd = self._lock()
        try:
            plan = self.read()
            if node is None:
                plan = {}
            else:
                plan.pop(node, None)
            self._write(plan)
        finally:
            os.close(fd)


def default_fault_file() -> Path:
    from fleetkeeper.core.cliutil import default_cluster_dir

    env = os.environ.get("FLEETKEEPER_FAULTS")
    return Path(env) if env else default_cluster_dir() / "faults.json"
