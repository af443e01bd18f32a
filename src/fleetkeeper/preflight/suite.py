"""The validation suite: checks with thresholds from a :class:`Profile`, run
against a swappable GPU backend and a host backend.

Backends
  * :class:`NvmlBackend`      NVML through nvidia-ml-py (inventory, PCIe, ECC, rows, thermals)
  * :class:`TorchBench`       optional PyTorch: matmul TFLOP/s, HBM copy bandwidth, NCCL all-reduce
  * ``dcgmi diag -r N``       where dcgmi is installed
  * :class:`SimulatedBackend` the fault plan of the local cluster (``validation:<check>`` fails that check)
  * :class:`NoGpuBackend`     no GPU: every GPU check says "skipped: no GPU", never "passed"

Each check returns a :class:`CheckResult` (check, value, threshold, passed,
skipped, duration, detail). A skipped check never counts as passed; the suite
passes when no check failed and every check the profile expects to run ran
(an expected GPU check that had to be skipped is a failure).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from fleetkeeper.preflight.config import CHECKS, Profile

GPU_CHECKS = ("gpu-count", "gpu-pcie", "gpu-ecc", "gpu-rows", "gpu-thermal", "gpu-matmul", "gpu-hbm", "nccl", "dcgm")


@dataclass
class CheckResult:
    check: str
    value: object = None
    threshold: object = None
    passed: bool = False
    skipped: bool = False
    duration: float = 0.0
    detail: str = ""

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("pass" if self.passed else "fail")


@dataclass
class GpuInfo:
    index: int
    uuid: str
    name: str
    pcie_gen: int
    pcie_width: int
    ecc_enabled: bool
    ecc_uncorrected: int
    ecc_corrected: int
    retired_pages: int
    remap_pending: bool
    remap_failed: bool
    temp_c: int
    sm_clock_mhz: int
    max_sm_clock_mhz: int


@dataclass
class SuiteResult:
    node: str
    profile: str
    passed: bool
    checks: list[CheckResult]
    gpus: list[str] = field(default_factory=list)  # UUIDs
    failed_gpus: list[str] = field(default_factory=list)
    started: float = 0.0
    duration: float = 0.0

    @property
    def failed_checks(self) -> list[str]:
        return [c.check for c in self.checks if c.status == "fail"]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = self.failed_checks
        return d


class Unavailable(Exception):
    """The backend cannot run this measurement here (no GPU, no torch, no dcgmi): a skip, never a pass."""


class GpuBackend(Protocol):
    name: str

    def gpus(self) -> list[GpuInfo]: ...
    def matmul_tflops(self, index: int) -> float: ...
    def hbm_gbps(self, index: int) -> float: ...
    def nccl_busbw_gbps(self) -> float: ...
    def dcgm_diag(self, level: int) -> tuple[bool, str]: ...


class HostBackend(Protocol):
    def cpus(self) -> int: ...
    def memory_gib(self) -> float: ...
    def disk(self, path: str) -> tuple[float, bool, str]: ...  # free GiB, writable, detail


# ------------------------------------------------------------------ backends
class NoGpuBackend:
    name = "none"

    def __init__(self, why: str = "no GPU"):
        self.why = why

    def gpus(self) -> list[GpuInfo]:
        raise Unavailable(self.why)

    def matmul_tflops(self, index: int) -> float:
        raise Unavailable(self.why)

    def hbm_gbps(self, index: int) -> float:
        raise Unavailable(self.why)

    def nccl_busbw_gbps(self) -> float:
        raise Unavailable(self.why)

    def dcgm_diag(self, level: int) -> tuple[bool, str]:
        raise Unavailable(self.why)


class NvmlBackend:
    """NVML for inventory and health; compute, HBM and NCCL through optional PyTorch; dcgmi if installed."""

    name = "nvml"

    def __init__(self, nvml=None, bench: "TorchBench | None" = None, dcgmi: str | None = None):
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        self.nvml = nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise Unavailable(f"no GPU (NVML: {exc})") from None
        self.bench = bench if bench is not None else TorchBench.load()
        self.dcgmi = dcgmi if dcgmi is not None else shutil.which("dcgmi")

    def _try(self, fn: Callable, default):
        try:
            return fn()
        except Exception:
            return default

    def gpus(self) -> list[GpuInfo]:
        n = self.nvml
        out = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            name = n.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            u = n.nvmlDeviceGetUUID(h)
            u = u.decode() if isinstance(u, bytes) else u
            ecc_cur = self._try(lambda: n.nvmlDeviceGetEccMode(h)[0], 0)
            unc = self._try(lambda: n.nvmlDeviceGetTotalEccErrors(h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                                  n.NVML_VOLATILE_ECC), 0)
            cor = self._try(lambda: n.nvmlDeviceGetTotalEccErrors(h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                                                  n.NVML_VOLATILE_ECC), 0)
            retired = self._try(lambda: len(n.nvmlDeviceGetRetiredPages(
                h, n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)), 0)
            remap = self._try(lambda: n.nvmlDeviceGetRemappedRows(h), (0, 0, False, False))
            out.append(GpuInfo(
                index=i, uuid=u, name=name,
                pcie_gen=self._try(lambda: n.nvmlDeviceGetCurrPcieLinkGeneration(h), 0),
                pcie_width=self._try(lambda: n.nvmlDeviceGetCurrPcieLinkWidth(h), 0),
                ecc_enabled=bool(ecc_cur), ecc_uncorrected=int(unc), ecc_corrected=int(cor),
                retired_pages=int(retired), remap_pending=bool(remap[2]), remap_failed=bool(remap[3]),
                temp_c=self._try(lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU), 0),
                sm_clock_mhz=self._try(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM), 0),
                max_sm_clock_mhz=self._try(lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM), 0),
            ))
        return out

    def _need_bench(self) -> "TorchBench":
        if self.bench is None:
            raise Unavailable("torch not installed")
        return self.bench

    def matmul_tflops(self, index: int) -> float:
        return self._need_bench().matmul_tflops(index)

    def hbm_gbps(self, index: int) -> float:
        return self._need_bench().hbm_gbps(index)

    def nccl_busbw_gbps(self) -> float:
        nccl_tests = shutil.which("all_reduce_perf")
        if nccl_tests:
            return nccl_tests_busbw(nccl_tests, len(self.gpus()))
        return self._need_bench().nccl_busbw_gbps()

    def dcgm_diag(self, level: int) -> tuple[bool, str]:
        if not self.dcgmi:
            raise Unavailable("dcgmi not installed")
        p = subprocess.run([self.dcgmi, "diag", "-r", str(level)], capture_output=True, text=True, timeout=1800)
        fails = [ln.strip() for ln in p.stdout.splitlines() if "Fail" in ln]
        return p.returncode == 0 and not fails, "; ".join(fails)[:200] or f"dcgmi diag -r {level} rc={p.returncode}"


def nccl_tests_busbw(binary: str, ngpus: int) -> float:
    """Run nccl-tests' all_reduce_perf on this node's GPUs; returns the average bus bandwidth (GB/s)."""
    p = subprocess.run([binary, "-b", "1G", "-e", "1G", "-g", str(max(1, ngpus)), "-n", "20"],
                       capture_output=True, text=True, timeout=900)
    for line in p.stdout.splitlines():
        if "Avg bus bandwidth" in line:
            return float(line.split(":")[1].strip())
    raise Unavailable(f"all_reduce_perf gave no bus bandwidth (rc={p.returncode})")


class TorchBench:
    """Compute, HBM and NCCL measurements with PyTorch (optional dependency)."""

    def __init__(self, torch):
        self.torch = torch

    @classmethod
    def load(cls) -> "TorchBench | None":
        try:
            import torch  # noqa: F401
        except ImportError:
            return None
        if not torch.cuda.is_available():
            return None
        return cls(torch)

    def matmul_tflops(self, index: int, n: int = 8192, iters: int = 50) -> float:
        t = self.torch
        dev = t.device("cuda", index)
        a = t.randn(n, n, device=dev, dtype=t.bfloat16)
        b = t.randn(n, n, device=dev, dtype=t.bfloat16)
        for _ in range(5):
            a @ b
        t.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        t.cuda.synchronize(dev)
        return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12

    def hbm_gbps(self, index: int, mib: int = 2048, iters: int = 20) -> float:
        t = self.torch
        dev = t.device("cuda", index)
        src = t.empty(mib * 2**20, dtype=t.uint8, device=dev)
        dst = t.empty_like(src)
        dst.copy_(src)
        t.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        t.cuda.synchronize(dev)
        return 2 * src.numel() * iters / (time.perf_counter() - t0) / 1e9  # read + write

    def nccl_busbw_gbps(self, mib: int = 1024, iters: int = 20) -> float:
        t = self.torch
        n = t.cuda.device_count()
        if n < 2:
            raise Unavailable("fewer than 2 GPUs: no all-reduce")
        import torch.multiprocessing as mp

        q = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_nccl_worker, args=(n, mib, iters, q), nprocs=n, join=True)
        return float(q.get())


def _nccl_worker(rank: int, world: int, mib: int, iters: int, q) -> None:  # pragma: no cover - needs GPUs
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device="cuda")
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    busbw = x.numel() * 4 / dt * 2 * (world - 1) / world / 1e9
    if rank == 0:
        q.put(busbw)
    dist.destroy_process_group()


class SimulatedBackend:
    """A healthy machine of ``profile``, broken only as the fault plan says.

    ``faults`` are the node's fault strings (``core.faults``): ``validation:<check>``
    fails that check; ``gpu-missing`` and ``xid:79`` lose a GPU; ``ecc`` adds an
    uncorrectable error; ``remap-pending`` a pending row remap.
    """

    name = "simulated"

    def __init__(self, node: str, profile: Profile, faults: list[str]):
        self.node, self.profile, self.faults = node, profile, set(faults)

    def _broken(self, check: str) -> bool:
        return f"validation:{check}" in self.faults

    def _jitter(self, what: str) -> float:  # deterministic, 0.90..0.97 of expected
        h = int(hashlib.sha256(f"{self.node}/{what}".encode()).hexdigest()[:8], 16)
        return 0.90 + (h % 700) / 10_000

    def gpus(self) -> list[GpuInfo]:
        p = self.profile
        if p.expected_gpus == 0:
            raise Unavailable("no GPU")
        n = p.expected_gpus - (1 if ({"gpu-missing", "xid:79"} & self.faults or self._broken("gpu-count")) else 0)
        out = []
        for i in range(n):
            out.append(GpuInfo(
                index=i, uuid="GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{self.node}.gpu{i}")),
                name=f"simulated {p.name}", pcie_gen=p.min_pcie_gen - (1 if self._broken("gpu-pcie") and i == 0 else 0),
                pcie_width=p.min_pcie_width, ecc_enabled=True,
                ecc_uncorrected=1 if (("ecc" in self.faults or self._broken("gpu-ecc")) and i == 0) else 0,
                ecc_corrected=0, retired_pages=0,
                remap_pending=("remap-pending" in self.faults or self._broken("gpu-rows")) and i == 0,
                remap_failed=False,
                temp_c=p.max_temp_c + 5 if (self._broken("gpu-thermal") and i == 0) else 45,
                sm_clock_mhz=1980, max_sm_clock_mhz=1980,
            ))
        return out

    def matmul_tflops(self, index: int) -> float:
        p = self.profile
        f = 0.5 if (self._broken("gpu-matmul") and index == 0) else self._jitter(f"mm{index}")
        return round(p.expected_tflops * f, 1)

    def hbm_gbps(self, index: int) -> float:
        p = self.profile
        f = 0.5 if (self._broken("gpu-hbm") and index == 0) else 1.0 + (self._jitter(f"hbm{index}") - 0.9)
        return round(p.min_hbm_gbps * f, 1)

    def nccl_busbw_gbps(self) -> float:
        p = self.profile
        if "net-down" in self.faults or self._broken("nccl"):
            return round(p.min_nccl_busbw_gbps * 0.3, 1)
        return round(p.min_nccl_busbw_gbps * (1.0 + (self._jitter("nccl") - 0.9)), 1)

    def dcgm_diag(self, level: int) -> tuple[bool, str]:
        if self._broken("dcgm"):
            return False, f"simulated dcgmi diag -r {level}: Memory test Fail"
        return True, f"simulated dcgmi diag -r {level}: all pass"


class RealHost:
    def cpus(self) -> int:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 0

    def memory_gib(self) -> float:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
        return 0.0

    def disk(self, path: str) -> tuple[float, bool, str]:
        free = shutil.disk_usage(path).free / 2**30
        probe = os.path.join(path, f".fleetkeeper-preflight-{os.getpid()}")
        try:
            data = os.urandom(1 << 20)
            with open(probe, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with open(probe, "rb") as f:
                ok = f.read() == data
            return free, ok, "" if ok else "read-back mismatch"
        except OSError as exc:
            return free, False, f"write probe failed: {exc.strerror or exc}"
        finally:
            try:
                os.unlink(probe)
            except OSError:
                pass


class SimulatedHost:
    def __init__(self, profile: Profile, faults: list[str]):
        self.profile, self.faults = profile, set(faults)

    def cpus(self) -> int:
        return self.profile.min_cpus // 2 if "validation:cpu" in self.faults else max(96, self.profile.min_cpus)

    def memory_gib(self) -> float:
        m = max(1843.0, self.profile.min_memory_gib)
        return m / 4 if "validation:memory" in self.faults else m

    def disk(self, path: str) -> tuple[float, bool, str]:
        if "disk-full" in self.faults or "validation:disk" in self.faults:
            return 0.0, True, "simulated: disk full"
        if "disk-ro" in self.faults or "disk-io" in self.faults:
            return 7000.0, False, "simulated: write probe failed"
        return 7000.0, True, ""


# ------------------------------------------------------------------ the suite
def _timed(check: str, fn: Callable[[], CheckResult]) -> CheckResult:
    t0 = time.perf_counter()
    try:
        r = fn()
    except Unavailable as exc:
        r = CheckResult(check, skipped=True, detail=f"skipped: {exc}")
    except Exception as exc:  # a crash of a probe is a failure with its reason, not a pass
        r = CheckResult(check, passed=False, detail=f"error: {type(exc).__name__}: {exc}"[:200])
    r.duration = round(time.perf_counter() - t0, 3)
    return r


def run_suite(node: str, profile: Profile, gpu: GpuBackend, host: HostBackend, *,
              checks: list[str] | None = None, dcgm_level: int | None = None,
              clock: Callable[[], float] = time.time) -> SuiteResult:
    """Run the profile's checks; ``checks`` restricts to a subset."""
    started = clock()
    t0 = time.perf_counter()
    wanted = [c for c in CHECKS if c not in profile.skip and (checks is None or c in checks)]
    results: list[CheckResult] = []
    inventory: list[GpuInfo] | None = None
    inv_error: str | None = None
    failed_gpus: set[str] = set()
    expects_gpus = profile.expected_gpus > 0

    def inv() -> list[GpuInfo]:
        nonlocal inventory, inv_error
        if inventory is None and inv_error is None:
            try:
                inventory = gpu.gpus()
            except Unavailable as exc:
                inv_error = str(exc)
        if inventory is None:
            raise Unavailable(inv_error or "no GPU")
        return inventory

    def worst(check: str, bad: Callable[[GpuInfo], bool], value: Callable[[GpuInfo], object],
              threshold: object, describe: Callable[[GpuInfo], str]) -> CheckResult:
        gs = inv()
        if not gs:
            raise Unavailable("no GPU")
        broken = [g for g in gs if bad(g)]
        failed_gpus.update(g.uuid for g in broken)
        g = broken[0] if broken else gs[0]
        return CheckResult(check, value(g), threshold, passed=not broken,
                           detail=(f"GPU {g.index} {g.uuid}: {describe(g)}" if broken else f"{len(gs)} GPUs ok"))

    def per_gpu_min(check: str, measure: Callable[[int], float], threshold: float, unit: str) -> CheckResult:
        gs = inv()
        vals = [(measure(g.index), g) for g in gs]
        if not vals:
            raise Unavailable("no GPU")
        low, g = min(vals, key=lambda x: x[0])
        bad = [x for x in vals if x[0] < threshold]
        failed_gpus.update(x[1].uuid for x in bad)
        return CheckResult(check, round(low, 1), threshold, passed=not bad,
                           detail=f"slowest GPU {g.index} {g.uuid}: {low:.1f} {unit}")

    p = profile
    impl: dict[str, Callable[[], CheckResult]] = {
        "gpu-count": lambda: (lambda gs: CheckResult("gpu-count", len(gs), p.expected_gpus,
                                                     passed=len(gs) >= p.expected_gpus,
                                                     detail=f"{len(gs)} visible, {p.expected_gpus} expected"))(inv()),
        "gpu-pcie": lambda: worst("gpu-pcie", lambda g: g.pcie_gen < p.min_pcie_gen or g.pcie_width < p.min_pcie_width,
                                  lambda g: f"gen{g.pcie_gen}x{g.pcie_width}", f"gen{p.min_pcie_gen}x{p.min_pcie_width}",
                                  lambda g: f"link gen{g.pcie_gen} x{g.pcie_width}"),
        "gpu-ecc": lambda: worst("gpu-ecc", lambda g: (p.require_ecc and not g.ecc_enabled)
                                 or g.ecc_uncorrected > p.max_ecc_uncorrected or g.ecc_corrected > p.max_ecc_corrected,
                                 lambda g: g.ecc_uncorrected, p.max_ecc_uncorrected,
                                 lambda g: f"ecc {'on' if g.ecc_enabled else 'off'}, uncorrected {g.ecc_uncorrected}, "
                                           f"corrected {g.ecc_corrected}"),
        "gpu-rows": lambda: worst("gpu-rows", lambda g: g.retired_pages > p.max_retired_pages or g.remap_failed
                                  or (g.remap_pending and not p.allow_pending_remap),
                                  lambda g: g.retired_pages, p.max_retired_pages,
                                  lambda g: f"retired pages {g.retired_pages}, remap pending {g.remap_pending}, "
                                            f"remap failed {g.remap_failed}"),
        "gpu-thermal": lambda: worst("gpu-thermal", lambda g: g.temp_c > p.max_temp_c,
                                     lambda g: g.temp_c, p.max_temp_c,
                                     lambda g: f"{g.temp_c} C, SM clock {g.sm_clock_mhz}/{g.max_sm_clock_mhz} MHz"),
        "gpu-matmul": lambda: per_gpu_min("gpu-matmul", gpu.matmul_tflops, p.min_tflops, "TFLOP/s"),
        "gpu-hbm": lambda: per_gpu_min("gpu-hbm", gpu.hbm_gbps, p.min_hbm_gbps, "GB/s"),
        "nccl": lambda: (lambda bw: CheckResult("nccl", round(bw, 1), p.min_nccl_busbw_gbps,
                                                passed=bw >= p.min_nccl_busbw_gbps,
                                                detail=f"all-reduce bus bandwidth {bw:.1f} GB/s"))(
            (inv(), gpu.nccl_busbw_gbps())[1]),
        "dcgm": lambda: (lambda r: CheckResult("dcgm", "pass" if r[0] else "fail", f"level {dcgm_level or p.dcgm_level}",
                                               passed=r[0], detail=r[1]))(
            (inv(), gpu.dcgm_diag(dcgm_level or p.dcgm_level))[1]),
        "cpu": lambda: (lambda n: CheckResult("cpu", n, p.min_cpus, passed=n >= p.min_cpus,
                                              detail=f"{n} CPUs usable"))(host.cpus()),
        "memory": lambda: (lambda m: CheckResult("memory", round(m, 1), p.min_memory_gib, passed=m >= p.min_memory_gib,
                                                 detail=f"{m:.1f} GiB"))(host.memory_gib()),
        "disk": lambda: (lambda d: CheckResult("disk", round(d[0], 1), p.min_disk_free_gib,
                                               passed=d[0] >= p.min_disk_free_gib and d[1],
                                               detail=d[2] or f"{d[0]:.1f} GiB free at {p.disk_path}, writable"))(
            host.disk(p.disk_path)),
    }
    for c in wanted:
        results.append(_timed(c, impl[c]))
    # A skipped check never counts as passed: the suite fails when a check failed, or when a check the
    # profile requires (``required``; gpu-count on GPU machines) could not run.
    required = set(p.required) | ({"gpu-count"} if expects_gpus else set())
    blocking = [r for r in results if r.status == "fail" or (r.skipped and r.check in required)]
    return SuiteResult(node=node, profile=p.name, passed=not blocking, checks=results,
                       gpus=[g.uuid for g in (inventory or [])], failed_gpus=sorted(failed_gpus),
                       started=started, duration=round(time.perf_counter() - t0, 3))
