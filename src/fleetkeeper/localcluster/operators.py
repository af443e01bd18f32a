"""Workload controllers against the local control plane (tests, benchmarks).

The JobSet controller and the MPI operator are built from their Go modules by
``hack/build-workload-controllers.sh`` (cached per version); the CRDs of the
kinds whose controllers are not run here (PyTorchJob, LeaderWorkerSet,
RayJob, RayCluster) come from their modules too. Each controller runs as its
own service account (the name its upstream manifests use), with a token from
the TokenRequest API, so admission sees the identity it sees in a real
cluster.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import ctypes
import logging
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fleetkeeper.core import errors
from fleetkeeper.core.kube import (CLUSTERROLEBINDINGS, CLUSTERROLES, CRDS, MUTATING_WEBHOOKS, NAMESPACES, SERVICEACCOUNTS, Kube)
from fleetkeeper.core.pki import write_serving_cert
from fleetkeeper.localcluster.cluster import REPO_ROOT, LocalCluster, free_port

log = logging.getLogger("fleetkeeper.localcluster.operators")

BUILD_SCRIPT = REPO_ROOT / "hack" / "build-workload-controllers.sh"
JOBSET = ("jobset-system", "jobset-controller-manager")
MPI = ("mpi-operator", "mpi-operator")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test or benchmark process dies, even
    killed (PR_SET_PDEATHSIG; Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def build(what: str = "all", timeout: float = 3600) -> dict[str, Path]:
    """Run the build script; returns name -> directory (binaries or CRDs)."""
    res = subprocess.run([str(BUILD_SCRIPT), what], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise errors.ClusterError(f"{BUILD_SCRIPT.name} {what} failed:\n{res.stderr[-3000:]}")
    out = {}
    for line in res.stdout.splitlines():
        k, _, v = line.partition("=")
        if v:
            out[k] = Path(v)
    return out


@dataclass
class Operators:
    cluster: LocalCluster
    kube: Kube
    workdir: Path
    namespace_labels: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: list = field(default_factory=list)
    webhook_configs: list[str] = field(default_factory=list)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        res = subprocess.run([self.cluster._bin("kubectl"), f"--kubeconfig={self.cluster.kubeconfig}", *args],
                             input=stdin, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise errors.ClusterError(f"kubectl {' '.join(args)}: {res.stderr.strip()[-2000:]}")
        return res.stdout

    async def install_crds(self, dirs: dict[str, Path]) -> list[str]:
        names = []
        for key, d in sorted(dirs.items()):
            if not key.startswith("crds-"):
                continue
            for f in sorted(d.glob("*.yaml")):
                self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
                names.append(f.stem.split("_", 1)[1] + "." + f.stem.split("_", 1)[0])
        # let namespace editors use the workloads (as the operators' own aggregated roles do)
        groups = sorted({n.split(".", 1)[1] for n in names})
        await self.kube.apply(CLUSTERROLES, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "fleetkeeper-workloads-edit",
                         "labels": {"rbac.authorization.k8s.io/aggregate-to-edit": "true",
                                    "rbac.authorization.k8s.io/aggregate-to-admin": "true"}},
            "rules": [{"apiGroups": groups, "resources": ["*"],
                       "verbs": ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]}]})
        for n in names:
            for _ in range(120):
                crd = await self.kube.get_or_none(CRDS, n)
                conds = {c["type"]: c["status"] for c in ((crd or {}).get("status") or {}).get("conditions") or []}
                if conds.get("Established") == "True":
                    break
                await asyncio.sleep(0.5)
            else:
                raise errors.ClusterError(f"CRD {n} not established")
        return names

    async def identity(self, namespace: str, sa: str) -> Path:
        """A kubeconfig for service account ``namespace/sa`` bound to cluster-admin."""
        for res, body, ns in (
            (NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}, None),
            (SERVICEACCOUNTS, {"apiVersion": "v1", "kind": "ServiceAccount",
                               "metadata": {"name": sa, "namespace": namespace}}, namespace),
            (CLUSTERROLEBINDINGS, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                                   "metadata": {"name": f"{namespace}-{sa}"},
                                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                               "name": "cluster-admin"},
                                   "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]},
             None),
        ):
            try:
                await self.kube.create(res, body, ns)
            except errors.Conflict:
                pass
        token = self.kubectl("create", "token", sa, "-n", namespace, "--duration=24h").strip()
        ca = base64.b64encode(Path(self.cluster.dir, "pki", "ca.crt").read_bytes()).decode()
        path = self.workdir / f"kubeconfig-{namespace}-{sa}"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.cluster.server}\n"
            f"    certificate-authority-data: {ca}\n"
            f"users:\n- name: {sa}\n  user:\n    token: {token}\n"
            f"contexts:\n- name: local\n  context:\n    cluster: local\n    user: {sa}\n"
            "current-context: local\n")
        path.chmod(0o600)
        return path

    def kill_all(self) -> None:
        """Synchronous last resort (atexit): no controller outlives its caller."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()

    def _spawn(self, name: str, argv: list[str]) -> None:
        if not self.procs:
            atexit.register(self.kill_all)
        logf = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(logf)
        self.procs[name] = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)

    def log_tail(self, name: str, n: int = 4000) -> str:
        p = self.workdir / f"{name}.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    async def start_jobset(self, bindir: Path) -> None:
        kc = await self.identity(*JOBSET)
        port = free_port()
        certs = write_serving_cert(self.workdir / "jobset-certs", ["127.0.0.1"])
        cfg = self.workdir / "jobset-config.yaml"
        cfg.write_text(
            "apiVersion: config.jobset.x-k8s.io/v1alpha1\nkind: Configuration\n"
            "internalCertManagement: {enable: false}\nleaderElection: {leaderElect: false}\n"
            f"health: {{healthProbeBindAddress: '127.0.0.1:{free_port()}'}}\n"
            "metrics: {bindAddress: '0'}\n"
            f"webhook: {{port: {port}, host: 127.0.0.1, certDir: '{certs.cert.parent}'}}\n"
            "clientConnection: {qps: 500, burst: 500}\n")
        self._spawn("jobset-controller", [str(bindir / "jobset-controller"), f"--kubeconfig={kc}",
                                          f"--config={cfg}", "--zap-log-level=info"])
        # the JobSet defaulting webhook (its controller expects defaulted JobSets)
        name = re.sub(r"[^a-z0-9-]", "-", f"jobset-defaulting-{self.workdir.name}".lower())[:63].strip("-")
        sel = {"matchLabels": dict(self.namespace_labels)} if self.namespace_labels else {}
        await self.kube.apply(MUTATING_WEBHOOKS, {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{"name": "mjobset.kb.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                          "failurePolicy": "Fail", "timeoutSeconds": 10, "namespaceSelector": sel,
                          "clientConfig": {"url": f"https://127.0.0.1:{port}/mutate-jobset-x-k8s-io-v1alpha2-jobset",
                                           "caBundle": base64.b64encode(certs.ca.read_bytes()).decode()},
                          "rules": [{"apiGroups": ["jobset.x-k8s.io"], "apiVersions": ["v1alpha2"],
                                     "operations": ["CREATE"], "resources": ["jobsets"]}]}]})
        self.webhook_configs.append(name)
        await self._wait_port(port, "jobset-controller")

    async def start_mpi(self, bindir: Path) -> None:
        kc = await self.identity(*MPI)
        self._spawn("mpi-operator", [str(bindir / "mpi-operator"), f"--kubeConfig={kc}", "--threadiness=4",
                                     "--kube-api-qps=200", "--kube-api-burst=400", "--lock-namespace=mpi-operator"])
        await asyncio.sleep(1.0)
        self._check("mpi-operator")

    def _check(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is not None:
            raise errors.ClusterError(f"{name} exited with {p.returncode}:\n{self.log_tail(name)}")

    async def _wait_port(self, port: int, name: str, timeout: float = 120) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            self._check(name)
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.5)
        raise errors.ClusterError(f"{name} did not open port {port}:\n{self.log_tail(name)}")

    async def stop(self) -> None:
        for name in self.webhook_configs:
            try:
                await self.kube.delete(MUTATING_WEBHOOKS, name)
            except errors.FleetkeeperError:
                pass
        for name, p in self.procs.items():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        self.procs.clear()
        for f in self.logs:
            f.close()
        self.logs.clear()
