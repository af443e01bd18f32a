"""The agent's check families. Each reads through an injectable root, file
or backend and returns :class:`Finding` values; none talks to the API server.

* :class:`DiskCheck`     full (threshold), read-only mount, kernel I/O errors
* :class:`GpuCheck`      NVML values (ECC, retired pages, remapped rows, lost
                         GPUs, GPUs missing versus the expected count) and Xid
                         codes (kernel log, NVML events, dcgm-exporter)
* :class:`NetworkCheck`  TCP connect (and ICMP where allowed) to targets
* maintenance events live in :mod:`fleetkeeper.health.cloud`
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fleetkeeper.health.conditions import (
    DISK_UNHEALTHY,
    GPU_UNHEALTHY,
    GPU_XID,
    NETWORK_UNREACHABLE,
    Finding,
)
from fleetkeeper.health.gpu import GpuBackend
from fleetkeeper.health.kernlog import IoError, KernelLog, XidEvent, scan

log = logging.getLogger("fleetkeeper.health.checks")


@dataclass(frozen=True, slots=True)
class Mount:
    device: str
    point: str
    fstype: str
    options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def parse_mounts(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = parts[1].replace("\\040", " ")
        out.append(Mount(parts[0], point, parts[2], tuple(parts[3].split(","))))
    return out


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount a path lives on: the longest mount point that prefixes it (last wins on ties)."""
    best: Mount | None = None
    for m in mounts:
        p = m.point.rstrip("/") or "/"
        if path == p or path.startswith(p.rstrip("/") + "/") or p == "/":
            if best is None or len(p) >= len(best.point.rstrip("/") or "/"):
                best = m
    return best


class KernelEvents:
    """Xid and I/O error records of the current boot, fed from a kernel log."""

    def __init__(self, log: KernelLog | None):
        self.log = log
        self.xids: list[XidEvent] = []
        self.io_errors: list[IoError] = []

    def poll(self) -> None:
        if self.log is None:
            return
        xids, ios = scan(self.log.read_new())
        self.xids = (self.xids + xids)[-200:]
        self.io_errors = (self.io_errors + ios)[-200:]


@dataclass
class DiskCheck:
    """``paths`` are the paths that matter (kubelet root, scratch, container
    storage) relative to ``root``; ``mounts_file`` is the mount table."""

    paths: tuple[str, ...] = ("/", "/var/lib/kubelet")
    full_percent: float = 95.0
    root: Path = Path("/")
    mounts_file: Path | None = None  # default <root>/proc/mounts
    kernel: KernelEvents | None = None
    usage: Callable[[str], tuple[int, int, int]] = shutil.disk_usage  # (total, used, free)
    io_error_devices_ignore: tuple[str, ...] = ("loop", "sr")

    def _real(self, p: str) -> str:
        return str(self.root / p.lstrip("/"))

    def check(self) -> list[Finding]:
        problems: list[Finding] = []
        mfile = self.mounts_file or (self.root / "proc" / "mounts")
        try:
            mounts = parse_mounts(Path(mfile).read_text())
        except OSError as exc:
            return [Finding(DISK_UNHEALTHY, True, "MountTableUnreadable", f"cannot read {mfile}: {exc}")]
        for p in self.paths:
            real = self._real(p)
            if not os.path.exists(real):
                continue
            m = mount_of(p, mounts)
            if m is not None and m.read_only:
                problems.append(Finding(DISK_UNHEALTHY, True, "ReadOnlyFilesystem",
                                        f"{p} is on {m.device} mounted read-only at {m.point}"))
            try:
                total, used, _free = self.usage(real)
            except OSError as exc:
                problems.append(Finding(DISK_UNHEALTHY, True, "DiskUnreadable", f"statfs {p}: {exc}"))
                continue
            if total > 0 and 100.0 * used / total >= self.full_percent:
                problems.append(Finding(DISK_UNHEALTHY, True, "DiskFull",
                                        f"{p} is {100.0 * used / total:.1f}% full (threshold {self.full_percent:g}%)"))
        if self.kernel is not None:
            self.kernel.poll()
            real = [e for e in self.kernel.io_errors if not e.device.startswith(self.io_error_devices_ignore)]
            devs = sorted({e.device for e in real})
            if devs:
                problems.append(Finding(DISK_UNHEALTHY, True, "IOErrors",
                                        f"kernel I/O errors on {', '.join(devs)}: {real[-1].line}"))
        return problems or [Finding.ok(DISK_UNHEALTHY, f"{len(self.paths)} path(s) below {self.full_percent:g}% "
                                                       "and writable; no kernel I/O errors")]


@dataclass
class GpuCheck:
    backend: GpuBackend
    expected: int = 0  # GPUs this machine type has; 0 = do not check the count
    kernel: KernelEvents | None = None
    dcgm_xids: Callable[[], dict[str, int]] | None = None
    ignore_xids: frozenset[int] = frozenset({13, 31, 43, 45})  # application errors, not the machine
    retired_pages_limit: int = 60  # NVIDIA's replacement threshold for page retirement (pre-Ampere)

    def check(self) -> list[Finding]:
        health: list[Finding] = []
        try:
            gpus = self.backend.sample()
        except Exception as exc:  # noqa: BLE001 - any backend failure is a finding, not a crash
            gpus = []
            health.append(Finding(GPU_UNHEALTHY, True, "GPUQueryFailed", f"cannot query GPUs: {exc}"[:500]))
        lost = [g for g in gpus if g.lost]
        visible = [g for g in gpus if not g.lost]
        if lost:
            health.append(Finding(GPU_UNHEALTHY, True, "GPULost",
                                  f"GPU(s) {', '.join(str(g.index) for g in lost)} fell off the bus"))
        if self.expected and len(gpus) < self.expected:  # a lost GPU is reported as lost, not missing
            health.append(Finding(GPU_UNHEALTHY, True, "GPUMissing",
                                  f"{len(gpus)} of {self.expected} GPUs present"))
        for g in visible:
            if g.remap_failure:
                health.append(Finding(GPU_UNHEALTHY, True, "RowRemapFailure",
                                      f"GPU {g.index} ({g.pci}) row remapping failed"))
            if g.ecc_uncorrected_volatile > 0:
                health.append(Finding(GPU_UNHEALTHY, True, "UncorrectableECC",
                                      f"GPU {g.index} ({g.pci}) {g.ecc_uncorrected_volatile} uncorrectable ECC errors"))
            if g.remap_pending or g.retired_pages_pending:
                health.append(Finding(GPU_UNHEALTHY, True, "RemapPending",
                                      f"GPU {g.index} ({g.pci}) has pending row remaps or page retirements "
                                      "(needs a GPU reset)"))
            if g.retired_pages_dbe >= self.retired_pages_limit:
                health.append(Finding(GPU_UNHEALTHY, True, "RetiredPagesExceeded",
                                      f"GPU {g.index} ({g.pci}) retired {g.retired_pages_dbe} pages"))
        xids: dict[int, str] = {}
        for g in visible:
            for code in g.xids:
                xids.setdefault(code, f"GPU {g.index}")
        if self.kernel is not None:
            self.kernel.poll()
            for e in self.kernel.xids:
                xids.setdefault(e.code, f"{e.pci}" + (f" ({e.detail})" if e.detail else ""))
        if self.dcgm_xids is not None:
            try:
                for gpu, code in self.dcgm_xids().items():
                    xids.setdefault(code, f"GPU {gpu} (DCGM)")
            except Exception as exc:  # noqa: BLE001 - DCGM is optional
                health.append(Finding(GPU_UNHEALTHY, False, "DCGMUnavailable", str(exc)[:200]))
        bad = {c: w for c, w in xids.items() if c not in self.ignore_xids}
        out = health or [Finding.ok(GPU_UNHEALTHY, f"{len(visible)} GPU(s) healthy")]
        if bad:
            codes = sorted(bad)
            out.append(Finding(GPU_XID, True, ",".join(f"Xid{c}" for c in codes)[:120],
                               "; ".join(f"Xid {c} on {bad[c]}" for c in codes)[:1000]))
        else:
            out.append(Finding.ok(GPU_XID, "no Xid errors in this boot" +
                                  (f" (ignored application Xids {sorted(xids)})" if xids else "")))
        return out


@dataclass(frozen=True)
class Target:
    host: str
    port: int = 0  # 0: ICMP
    name: str = ""

    def __str__(self) -> str:
        return self.name or (f"{self.host}:{self.port}" if self.port else f"{self.host} (icmp)")


def parse_target(text: str) -> Target:
    """``host:port`` (TCP), ``icmp://host`` or ``name=host:port``."""
    name = ""
    if "=" in text:
        name, text = text.split("=", 1)
    if text.startswith("icmp://"):
        return Target(text[7:], 0, name)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {text!r}: expected host:port or icmp://host")
    return Target(host.strip("[]"), int(port), name)


async def tcp_probe(t: Target, timeout: float) -> str | None:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(t.host, t.port), timeout)
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass
        return None
    except (OSError, asyncio.TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"[:120] if str(exc) else type(exc).__name__


async def icmp_probe(t: Target, timeout: float) -> str | None:
    """One echo through ``ping`` (needs CAP_NET_RAW or ping_group_range)."""
    ping = shutil.which("ping")
    if ping is None:
        return None  # ICMP not available here: do not count as a failure
    proc = await asyncio.create_subprocess_exec(ping, "-c", "1", "-W", str(max(1, int(timeout))), t.host,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode == 0:
        return None
    if b"not permitted" in err or b"socket" in err.lower():
        return None
    return f"no echo reply ({err.decode(errors='replace').strip()[:80] or f'rc {proc.returncode}'})"


class PeerSource:
    """This node's peers, learnt without watching the API server:

    * ``file``: one peer per line (``host``, ``host:port`` or ``name=host:port``; ``#`` comments), e.g. a
      ConfigMap mounted into the DaemonSet (the kubelet keeps it current); re-read when it changes;
    * ``dns``: a name resolving to every peer, e.g. a headless Service over the agent DaemonSet with
      ``hostNetwork`` (node IPs); re-resolved at most every ``refresh`` seconds.

    ``exclude`` (this node's name and IPs) is never probed. A source that cannot be read gives no peers
    (and says why in ``error``): a broken peer list must not make every node look unreachable."""

    def __init__(self, *, file: Path | None = None, dns: str | None = None, port: int = 10250,
                 exclude: tuple[str, ...] = (), refresh: float = 600.0,
                 resolver: Callable | None = None, clock: Callable[[], float] = time.monotonic):
        if not file and not dns:
            raise ValueError("a peer source needs a file or a DNS name")
        self.file, self.dns, self.port, self.refresh = file, dns, port, refresh
        self.exclude = {e for e in exclude if e}
        self.resolver = resolver or _resolve_all
        self.clock = clock
        self.error = ""
        self._cache: list[Target] = []
        self._stamp: object = None
        self._at = -1e18

    def _parse(self, text: str) -> list[Target]:
        out = []
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, addr = line.rpartition("=")
            # host:port (IPv6 as [addr]:port) goes through parse_target; a bare host gets the default port
            out.append(parse_target(line) if ":" in addr else Target(addr, self.port, name))
        return out

    async def peers(self) -> list[Target]:
        try:
            if self.file is not None:
                st = self.file.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if stamp != self._stamp:
                    self._cache, self._stamp = self._parse(self.file.read_text()), stamp
            elif self.clock() - self._at >= self.refresh:
                hosts = await self.resolver(self.dns)
                self._cache, self._at = [Target(h, self.port) for h in sorted(set(hosts))], self.clock()
            self.error = ""
        except (OSError, ValueError) as exc:
            if str(exc) != self.error:
                log.warning("peer list %s unusable: %s; probing no peers", self.file or self.dns, exc)
            self.error = str(exc)[:200]
            self._cache, self._stamp = [], None
        return [t for t in self._cache if t.host not in self.exclude and t.name not in self.exclude]


async def _resolve_all(name: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return [i[4][0] for i in infos]


@dataclass
class NetworkCheck:
    """Unreachable when more than ``max_failed_fraction`` of targets fail
    (a sample of peers may include a peer that is itself down). Targets are the fixed ones (API
    endpoint, gateway) plus, each cycle, ``peer_sample`` peers drawn at random from ``peers``, so over
    time every node probes many others and a partitioned node is caught from its own side."""

    targets: tuple[Target, ...] = ()
    timeout: float = 2.0
    max_failed_fraction: float = 0.5
    attempts: int = 2
    tcp: Callable = field(default=tcp_probe)
    icmp: Callable = field(default=icmp_probe)
    peers: PeerSource | None = None
    peer_sample: int = 3
    rng: random.Random = field(default_factory=random.Random)

    async def _one(self, t: Target) -> str | None:
        err = None
        for _ in range(self.attempts):
            err = await (self.tcp(t, self.timeout) if t.port else self.icmp(t, self.timeout))
            if err is None:
                return None
        return err

    async def check(self) -> list[Finding]:
        targets = self.targets
        if self.peers is not None and self.peer_sample > 0:
            pool = await self.peers.peers()
            targets = targets + tuple(self.rng.sample(pool, min(self.peer_sample, len(pool))))
        if not targets:
            why = f" (peer list: {self.peers.error})" if self.peers is not None and self.peers.error else ""
            return [Finding.ok(NETWORK_UNREACHABLE, "no targets configured" + why)]
        results = await asyncio.gather(*(self._one(t) for t in targets))
        failed = [(t, e) for t, e in zip(targets, results) if e is not None]
        frac = len(failed) / len(targets)
        if failed and (frac > self.max_failed_fraction or len(failed) == len(targets)):
            return [Finding(NETWORK_UNREACHABLE, True, "TargetsUnreachable",
                            f"{len(failed)}/{len(targets)} targets unreachable: "
                            + "; ".join(f"{t}: {e}" for t, e in failed)[:900])]
        note = f"{len(targets) - len(failed)}/{len(targets)} targets reachable"
        if failed:
            note += f" (down: {', '.join(str(t) for t, _ in failed)})"
        return [Finding.ok(NETWORK_UNREACHABLE, note)]
