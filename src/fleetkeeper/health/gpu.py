"""GPU backends: NVML through nvidia-ml-py, a fake for tests, and a parser of
dcgm-exporter's metrics for Xid fields where DCGM runs.

A backend answers :meth:`GpuBackend.sample` with one :class:`GpuSample` per
GPU it can see, plus GPUs it lost (``lost=True``: NVML answers
``GPU_IS_LOST`` for a GPU that fell off the bus).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Protocol

log = logging.getLogger("fleetkeeper.health.gpu")


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    pci: str = ""
    uuid: str = ""
    lost: bool = False  # fell off the bus (NVML_ERROR_GPU_IS_LOST)
    ecc_uncorrected_volatile: int = 0
    retired_pages_pending: bool = False
    retired_pages_dbe: int = 0
    remap_pending: bool = False
    remap_failure: bool = False
    remapped_uncorrectable: int = 0
    xids: tuple[int, ...] = ()  # Xid codes the backend saw (NVML events, DCGM)


class GpuBackend(Protocol):
    def sample(self) -> list[GpuSample]: ...


class NoGpuBackend:
    def sample(self) -> list[GpuSample]:
        return []


@dataclass
class FakeGpuBackend:
    """Tests set ``gpus`` (and mutate them) to any fault state."""

    gpus: list[GpuSample] = field(default_factory=list)

    @classmethod
    def healthy(cls, count: int = 8) -> "FakeGpuBackend":
        return cls([GpuSample(i, pci=f"PCI:0000:{0x10 + i:02x}:00", uuid=f"GPU-fake-{i}") for i in range(count)])

    def set(self, index: int, **changes: object) -> None:
        self.gpus[index] = replace(self.gpus[index], **changes)  # type: ignore[arg-type]

    def remove(self, index: int) -> None:
        self.gpus = [g for g in self.gpus if g.index != index]

    def sample(self) -> list[GpuSample]:
        return list(self.gpus)


class NvmlBackend:
    """Real GPUs through NVML (nvidia-ml-py). Unsupported queries (no ECC on
    the SKU, no row remapping before Ampere) count as "no problem"."""

    def __init__(self) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self._events = None
        try:  # Xid critical errors arrive as NVML events
            self._events = pynvml.nvmlEventSetCreate()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                try:
                    pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, self._events)
                except pynvml.NVMLError:
                    pass
        except pynvml.NVMLError:
            self._events = None
        self._xids: dict[str, set[int]] = {}

    def _drain_events(self) -> None:
        if self._events is None:
            return
        nv = self.nv
        while True:
            try:
                ev = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError:
                return
            try:
                uuid = nv.nvmlDeviceGetUUID(ev.device)
            except nv.NVMLError:
                uuid = "?"
            self._xids.setdefault(uuid if isinstance(uuid, str) else uuid.decode(), set()).add(int(ev.eventData))

    def _call(self, fn, *a, default=None):
        try:
            return fn(*a)
        except self.nv.NVMLError_NotSupported:
            return default
        except self.nv.NVMLError as exc:
            if isinstance(exc, getattr(self.nv, "NVMLError_GPUIsLost", ())):
                raise
            log.debug("NVML %s failed: %s", getattr(fn, "__name__", fn), exc)
            return default

    def sample(self) -> list[GpuSample]:
        nv = self.nv
        self._drain_events()
        out = []
        count = nv.nvmlDeviceGetCount()
        for i in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                pci = nv.nvmlDeviceGetPciInfo(h).busId
                pci = pci.decode() if isinstance(pci, bytes) else pci
                uuid = nv.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                ecc = self._call(nv.nvmlDeviceGetTotalEccErrors, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                 nv.NVML_VOLATILE_ECC, default=0)
                pending = self._call(nv.nvmlDeviceGetRetiredPagesPendingStatus, h, default=0)
                dbe = self._call(nv.nvmlDeviceGetRetiredPages, h,
                                 nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR, default=[])
                remap = self._call(nv.nvmlDeviceGetRemappedRows, h, default=(0, 0, 0, 0))
                _corr, unc, rpending, rfail = remap
                out.append(GpuSample(
                    i, pci=f"PCI:{pci}", uuid=uuid, ecc_uncorrected_volatile=int(ecc or 0),
                    retired_pages_pending=bool(pending), retired_pages_dbe=len(dbe or []),
                    remap_pending=bool(rpending), remap_failure=bool(rfail), remapped_uncorrectable=int(unc or 0),
                    xids=tuple(sorted(self._xids.get(uuid, ()))),
                ))
            except nv.NVMLError as exc:
                if isinstance(exc, getattr(nv, "NVMLError_GPUIsLost", ())):
                    out.append(GpuSample(i, lost=True))
                else:
                    log.warning("NVML query of GPU %d failed: %s", i, exc)
        return out

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def parse_dcgm_xids(text: str) -> dict[str, int]:
    """``DCGM_FI_DEV_XID_ERRORS`` per GPU from dcgm-exporter's /metrics
    (the value is the last Xid code seen; 0 means none)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "DCGM_FI_DEV_XID_ERRORS":
            continue
        for s in fam.samples:
            gpu = s.labels.get("gpu", s.labels.get("UUID", "?"))
            if s.value:
                out[gpu] = int(s.value)
    return out
