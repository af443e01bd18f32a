"""Start, inspect and stop the local control plane.

State lives in one directory (default ``~/.local/state/fleetkeeper/cluster``,
``$FLEETKEEPER_CLUSTER_DIR`` overrides): ``state.json`` (ports, pids,
options), ``pki/``, ``kubeconfig``, ``logs/``, ``etcd/``. Every process binds
to 127.0.0.1 only. ``up`` is idempotent: processes that run are kept, missing
ones are started, missing nodes are created.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from fleetkeeper.core import errors
from fleetkeeper.core.cliutil import default_cluster_dir
from fleetkeeper.core.kube import NODES, Kube, RetryPolicy
from fleetkeeper.core.ratelimit import TokenBucket
from fleetkeeper.localcluster import pki
from fleetkeeper.localcluster.fleet import KWOK_LABEL, KWOK_LABEL_VALUE, NODE_IP, FleetSpec, node_manifest

log = logging.getLogger("fleetkeeper.localcluster")

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-controlplane.sh"
REALNODE_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-realnode.sh"
IMAGES_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-images.sh"
VERSIONS_FILE = REPO_ROOT / "hack" / "versions.env"
# the controller manager's and scheduler's own metrics (workqueues, scheduling attempts) readable without a
# token on their loopback ports, like their health endpoints: the first place to look when the control plane lags
METRICS_OPEN = "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"
COMPONENTS = ("etcd", "etcd-events", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
FEATURE_GATES = "GenericWorkload=true,GangScheduling=true"
RUNTIME_CONFIG = "scheduling.k8s.io/v1alpha2=true"
# Test identities (static token file). Team membership comes from groups.
TEST_USERS = {
    "alice": ["team-a"],
    "bob": ["team-b"],
    "carol": ["team-c"],
    "mallory": [],
}

Progress = Callable[[str], None]


def default_dir() -> Path:
    return default_cluster_dir()


def versions() -> dict[str, str]:
    out = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def _run_build(script: Path, tag: str, progress: Progress | None, *args: str) -> str:
    tail: list[str] = []
    with subprocess.Popen(["bash", str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            if line.startswith(f"[{tag}]") and progress:
                progress(line.removeprefix(f"[{tag}] "))
        out = proc.stdout.read()
    if proc.returncode != 0:
        raise errors.ClusterError(f"{script.name} failed:\n" + "\n".join(tail))
    return out


def ensure_realnode_binaries(progress: Progress | None = None) -> Path:
    """kubelet, kube-proxy, containerd, CoreDNS, pause (hack/build-realnode.sh, cached)."""
    if not REALNODE_BUILD_SCRIPT.exists():
        raise errors.ClusterError(f"{REALNODE_BUILD_SCRIPT} not found: the real node needs a fleetkeeper checkout")
    return Path(_run_build(REALNODE_BUILD_SCRIPT, "build-realnode", progress).strip().splitlines()[-1])


def ensure_image_archives(cluster_dir: Path, progress: Progress | None = None) -> list[Path]:
    """fleetkeeper's images (hack/build-images.sh) as OCI archives for the real node's containerd."""
    # one place for every cluster: build-images.sh skips images (and archives) of unchanged sources
    cache = Path(os.environ.get("FLEETKEEPER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "fleetkeeper")
    out = cache / "images" / "archives"
    _run_build(IMAGES_BUILD_SCRIPT, "build-images", progress, "--archive", str(out))
    return sorted(out.glob("*.oci.tar"))


async def apply_dns_rbac(kube: Kube) -> None:
    """What the real node's CoreDNS reads (its user is in group fleetkeeper:coredns)."""
    from fleetkeeper.core.kube import CLUSTERROLEBINDINGS, CLUSTERROLES

    await kube.apply(CLUSTERROLES, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "fleetkeeper:coredns"},
        "rules": [{"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                  {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]})
    await kube.apply(CLUSTERROLEBINDINGS, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "fleetkeeper:coredns"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fleetkeeper:coredns"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "fleetkeeper:coredns"}]})


def ensure_binaries(progress: Progress | None = None) -> Path:
    """Build (or reuse) the control-plane binaries; returns their directory."""
    env_dir = os.environ.get("FLEETKEEPER_BIN_DIR")
    if env_dir:
        return Path(env_dir)
    if not BUILD_SCRIPT.exists():
        raise errors.ClusterError(f"{BUILD_SCRIPT} not found: run from a fleetkeeper checkout or set FLEETKEEPER_BIN_DIR")
    tail: list[str] = []
    with subprocess.Popen(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            if line.startswith("[build-controlplane]") and progress:
                progress(line.removeprefix("[build-controlplane] "))
        out = proc.stdout.read().strip().splitlines()
        rc = proc.wait()
    if rc != 0 or not out:
        raise errors.ClusterError("building the control plane failed:\n" + "\n".join(tail))
    return Path(out[-1])


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_listenable(port: int, timeout: float = 90.0) -> bool:
    """Wait until a listener can take ``port`` again. A killed server's accepted
    connections stay in FIN-WAIT on its port until each client closes its end, or
    for tcp_fin_timeout (60 s) when a client never reads again (a client of a
    finished event loop): meanwhile a restarted server fails to listen there, even
    with SO_REUSEADDR. A bind alone can succeed while the listen would fail, so
    this tries both."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                s.listen(1)
                return True
            except OSError:
                pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in path.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port inside it can be taken by any outgoing
    connection while its component is down, even by a client retrying that very port (TCP
    self-connect on loopback), and the restarted component then fails with "address already in use"."""
    lo, _ = ephemeral_range()
    first = max(10000, lo - 12000)
    if lo - first >= 100:
        rng = secrets.SystemRandom()
        for _ in range(200):
            port = rng.randrange(first, lo)
            if port_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the range: let the kernel pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SIM_RESULT_KEY = '.metadata.annotations["fleetkeeper.io/sim-result"]'


def kwok_stage_docs(kwok_docs: list[str], ours: str) -> list[str]:
    """KWOK's stage documents and fleetkeeper's, as one KWOK configuration's parts.

    KWOK picks one stage among those a pod matches, at random by weight. Its ``pod-complete``
    stage ends a Job's running pod after 1-5 s; a pod that says how it ends
    (``fleetkeeper.io/sim-result``) also matches fleetkeeper's stage (weight 10 to 1), so about one
    such pod in eleven ended after 1-5 s instead of its ``sim-delay``. ``pod-complete`` is kept
    for every other pod and left out for those."""
    out = []
    for text in kwok_docs:
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            if doc.get("kind") == "Stage" and doc["metadata"]["name"] == "pod-complete":
                exprs = doc["spec"].setdefault("selector", {}).setdefault("matchExpressions", [])
                exprs.append({"key": SIM_RESULT_KEY, "operator": "DoesNotExist"})
            out.append(yaml.safe_dump(doc, sort_keys=False))
    out.append(ours)
    return out


@dataclass
class Ports:
    apiserver: int = 0
    etcd: int = 0
    etcd_peer: int = 0
    etcd_events: int = 0
    etcd_events_peer: int = 0
    controller_manager: int = 0
    scheduler: int = 0
    kwok: int = 0


@dataclass
class State:
    ports: Ports = field(default_factory=Ports)
    pids: dict[str, int] = field(default_factory=dict)
    token: str = ""
    user_tokens: dict[str, str] = field(default_factory=dict)
    events_etcd: bool = False
    bin_dir: str = ""
    gpus_per_node: int = 8
    real_node: bool = False            # the API server serves a real node on the host's address
    host_ip: str = ""
    node_tokens: dict[str, str] = field(default_factory=dict)  # real node, kube-proxy, CoreDNS
    # kube-scheduler tuning (benchmarks compare settings; 0 / "" = kube-scheduler's defaults)
    scheduler_initial_backoff_seconds: int = 0
    scheduler_max_backoff_seconds: int = 0
    scheduler_feature_gates: str = ""  # extra gates, e.g. "SchedulerAsyncPreemption=false"
    scheduler_verbosity: int = 1

    @classmethod
    def load(cls, path: Path) -> "State":
        d = json.loads(path.read_text())
        d["ports"] = Ports(**d.get("ports", {}))
        return cls(**d)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def _reap_later(pid: int) -> None:
    """Collect the exit status of a child we started, so it does not linger as a zombie."""
    import threading

    def wait() -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    threading.Thread(target=wait, daemon=True, name=f"reap-{pid}").start()


def _exited(pid: int) -> bool:
    """Has a process we just started exited? (It may not have exec'd its binary
    yet, so its name is not checked here.)"""
    try:
        os.kill(pid, 0)
        raw = Path(f"/proc/{pid}/stat").read_text()
        return raw[raw.rindex(")") + 2] == "Z"
    except (OSError, ValueError):
        return True


def _alive(pid: int, name: str) -> bool:
    try:
        os.kill(pid, 0)
        raw = Path(f"/proc/{pid}/stat").read_text()
        if raw[raw.rindex(")") + 2] == "Z":  # exited, not yet reaped
            return False
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        return Path(cmd).name == name.replace("etcd-events", "etcd")
    except (OSError, ValueError):
        return False


def _gone(pid: int) -> bool:
    """Has a process we signalled finished exiting? Its command line empties early in its exit,
    while it still holds its listening sockets; only a zombie (or no process) has let them go, so a
    restart must wait for that, not for :func:`_alive`, or it finds its port "already in use"."""
    try:
        os.kill(pid, 0)
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return True
    return raw[raw.rindex(")") + 2] in "ZX"


class LocalCluster:
    def __init__(self, directory: Path | None = None):
        self.dir = Path(directory or default_dir())
        self.state_path = self.dir / "state.json"
        self.state = State.load(self.state_path) if self.state_path.exists() else State()

    # --- paths ------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def user_kubeconfig(self, user: str) -> Path:
        return self.dir / f"kubeconfig-{user}"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state.ports.apiserver}"

    def _bin(self, name: str) -> str:
        return str(Path(self.state.bin_dir) / name.replace("etcd-events", "etcd"))

    # --- status -----------------------------------------------------------
    def running(self) -> dict[str, bool]:
        wanted = [c for c in COMPONENTS if c != "etcd-events" or self.state.events_etcd]
        return {c: (c in self.state.pids and _alive(self.state.pids[c], c)) for c in wanted}

    def is_up(self) -> bool:
        r = self.running()
        return bool(r) and all(r.values())

    # --- setup ------------------------------------------------------------
    def _choose_ports(self, apiserver_port: int | None) -> None:
        p = self.state.ports
        if apiserver_port:
            p.apiserver = apiserver_port
        for name in ("apiserver", "etcd", "etcd_peer", "etcd_events", "etcd_events_peer",
                     "controller_manager", "scheduler", "kwok"):
            if not getattr(p, name):
                setattr(p, name, free_port())

    def _check_ports(self, running: dict[str, bool]) -> None:
        p = self.state.ports
        owners = {
            "kube-apiserver": [p.apiserver], "etcd": [p.etcd, p.etcd_peer],
            "etcd-events": [p.etcd_events, p.etcd_events_peer], "kube-controller-manager": [p.controller_manager],
            "kube-scheduler": [p.scheduler], "kwok": [p.kwok],
        }
        for comp, ports in owners.items():
            if running.get(comp) or (comp == "etcd-events" and not self.state.events_etcd):
                continue
            for port in ports:
                if not port_free(port):
                    raise errors.ClusterError(
                        f"port {port} on 127.0.0.1 (for {comp}) is already in use by another process. "
                        f"Stop that process, run 'fleetkeeper cluster down' if it is an old cluster, "
                        f"or choose another port (--port for the API server; others are picked automatically "
                        f"after 'fleetkeeper cluster down --purge')."
                    )

    def _write_auth(self) -> None:
        st = self.state
        if not st.token:
            st.token = secrets.token_hex(24)
        for user in TEST_USERS:
            st.user_tokens.setdefault(user, secrets.token_hex(24))
        lines = [f'{st.token},admin,admin-uid,"system:masters"']
        for user, groups in TEST_USERS.items():
            g = ",".join(groups + ["researchers"])
            lines.append(f'{st.user_tokens[user]},{user},{user}-uid,"{g}"')
        if st.real_node:
            from fleetkeeper.localcluster.realnode import NODE_NAME

            for who in ("node", "proxy", "dns"):
                st.node_tokens.setdefault(who, secrets.token_hex(24))
            lines += [f'{st.node_tokens["node"]},system:node:{NODE_NAME},node-uid,"system:nodes"',
                      f'{st.node_tokens["proxy"]},system:kube-proxy,kube-proxy-uid',
                      f'{st.node_tokens["dns"]},fleetkeeper:coredns,coredns-uid,"fleetkeeper:coredns"']
        tokens = self.dir / "pki" / "tokens.csv"
        tokens.write_text("\n".join(lines) + "\n")
        tokens.chmod(0o600)
        ca = (self.dir / "pki" / "ca.crt").read_text()
        import base64

        ca_b64 = base64.b64encode(ca.encode()).decode()

        def kubeconfig(user: str, token: str) -> str:
            return (
                "apiVersion: v1\nkind: Config\n"
                f"clusters:\n- name: fleetkeeper-local\n  cluster:\n    server: {self.server}\n"
                f"    certificate-authority-data: {ca_b64}\n"
                f"users:\n- name: {user}\n  user:\n    token: {token}\n"
                f"contexts:\n- name: fleetkeeper-local\n  context:\n    cluster: fleetkeeper-local\n    user: {user}\n"
                "current-context: fleetkeeper-local\n"
            )

        self.kubeconfig.write_text(kubeconfig("admin", st.token))
        self.kubeconfig.chmod(0o600)
        for user, token in st.user_tokens.items():
            path = self.user_kubeconfig(user)
            path.write_text(kubeconfig(user, token))
            path.chmod(0o600)

    def _kwok_config(self) -> Path:
        stages_dir = Path(self.state.bin_dir) / "kwok-stages"
        docs = kwok_stage_docs([f.read_text() for f in sorted(stages_dir.glob("*.yaml"))],
                               (Path(__file__).parent / "stages.yaml").read_text())
        # more parallel stage workers than KWOK's default 4, so thousands of joining
        # nodes become Ready in tens of seconds on a small machine
        docs.append("apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions:\n"
                    "  nodePlayStageParallelism: 16\n  podPlayStageParallelism: 16\n  nodeLeaseParallelism: 16\n")
        path = self.dir / "kwok.yaml"
        path.write_text("\n---\n".join(d.strip() for d in docs) + "\n")
        return path

    def _command(self, comp: str) -> list[str]:
        p, d = self.state.ports, self.dir
        pk = d / "pki"
        if comp in ("etcd", "etcd-events"):
            client, peer = (p.etcd, p.etcd_peer) if comp == "etcd" else (p.etcd_events, p.etcd_events_peer)
            return [
                self._bin("etcd"), f"--name={comp}", f"--data-dir={d / comp}",
                f"--listen-client-urls=http://127.0.0.1:{client}", f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster={comp}=http://127.0.0.1:{peer}", "--quota-backend-bytes=8589934592",
                "--unsafe-no-fsync=true", "--log-level=warn", "--snapshot-count=50000",
            ]
        if comp == "kube-apiserver":
            real = self.state.real_node
            cmd = [
                self._bin(comp), f"--etcd-servers=http://127.0.0.1:{p.etcd}",
                f"--bind-address={'0.0.0.0' if real else '127.0.0.1'}",
                f"--advertise-address={self.state.host_ip if real else '127.0.0.1'}", f"--secure-port={p.apiserver}",
                f"--tls-cert-file={pk / 'apiserver.crt'}", f"--tls-private-key-file={pk / 'apiserver.key'}",
                f"--client-ca-file={pk / 'ca.crt'}", f"--token-auth-file={pk / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC", "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pk / 'sa.pub'}", f"--service-account-signing-key-file={pk / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true",
                # simulated nodes: no TaintNodesByCondition admission, which taints every new node not-ready
                # even when it registers Ready; the controller manager then lifts 7,500 taints one write at a time
                # (tens of minutes on this machine). Nodes that register NotReady carry the taint themselves
                # (fleet.node_manifest), as the plugin would have added it.
                *([] if real else ["--endpoint-reconciler-type=none",
                                   "--disable-admission-plugins=TaintNodesByCondition"]),
                f"--feature-gates={FEATURE_GATES}",
                f"--runtime-config={RUNTIME_CONFIG}", "--max-requests-inflight=800",
                "--max-mutating-requests-inflight=400", "--v=1",
            ]
            if self.state.events_etcd:
                cmd.append(f"--etcd-servers-overrides=/events#http://127.0.0.1:{p.etcd_events}")
            if real:  # a kubelet and pods reach it on the host's address; it reaches them (webhooks, logs)
                cmd += ["--kubelet-preferred-address-types=InternalIP,Hostname", "--enable-aggregator-routing=true",
                        f"--kubelet-client-certificate={pk / 'apiserver-kubelet-client.crt'}",
                        f"--kubelet-client-key={pk / 'apiserver-kubelet-client.key'}"]
            return cmd
        if comp == "kube-controller-manager":
            # no ttl controller: it annotates every node with the kubelet's object-cache TTL, again each time the
            # fleet crosses a size step, one write per node that simulated nodes never read (a real kubelet
            # without it uses its default TTL); at 7,500 nodes its queue held thousands of node writes
            return [
                self._bin(comp), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                "--bind-address=127.0.0.1", f"--secure-port={p.controller_manager}",
                f"--service-account-private-key-file={pk / 'sa.key'}", f"--root-ca-file={pk / 'ca.crt'}",
                "--controllers=*,-nodeipam,-bootstrapsigner,-tokencleaner,-ttl", "--kube-api-qps=200",
                "--kube-api-burst=400", "--node-monitor-grace-period=900s", "--node-startup-grace-period=600s", f"--feature-gates={FEATURE_GATES}",
                "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10", "--v=1", METRICS_OPEN,
            ]
        if comp == "kube-scheduler":
            cfg = d / "scheduler.yaml"
            st = self.state
            backoff = "".join(
                f"{k}: {v}\n" for k, v in (("podInitialBackoffSeconds", st.scheduler_initial_backoff_seconds),
                                           ("podMaxBackoffSeconds", st.scheduler_max_backoff_seconds)) if v)
            cfg.write_text(
                "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
                f"clientConnection:\n  kubeconfig: {self.kubeconfig}\n  qps: 500\n  burst: 1000\n"
                "leaderElection:\n  leaderElect: false\n" + backoff
            )
            gates = FEATURE_GATES + (f",{st.scheduler_feature_gates}" if st.scheduler_feature_gates else "")
            return [
                self._bin(comp), f"--config={cfg}", "--bind-address=127.0.0.1", f"--secure-port={p.scheduler}",
                f"--feature-gates={gates}", f"--v={st.scheduler_verbosity}", METRICS_OPEN,
            ]
        if comp == "kwok":
            return [
                self._bin(comp), f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=false",
                f"--manage-nodes-with-label-selector={KWOK_LABEL}={KWOK_LABEL_VALUE}",
                "--node-lease-duration-seconds=600", f"--config={self._kwok_config()}",
                "--server-address=127.0.0.1:" + str(p.kwok), "--cidr=10.128.0.0/10", f"--node-ip={NODE_IP}",
                "--v=WARN",
            ]
        raise ValueError(comp)

    def _start(self, comp: str) -> None:
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cmd = self._command(comp)
        # posix_spawn, not Popen: the process outlives this one (its own session),
        # and is tracked by pid in state.json, not by a Popen object.
        log_fd = os.open(logs / f"{comp}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            pid = os.posix_spawn(cmd[0], cmd, dict(os.environ), setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ])
        finally:
            os.close(log_fd)
        self.state.pids[comp] = pid
        self.state.save(self.state_path)
        _reap_later(pid)

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))

    def _wait_http(self, comp: str, url: str, timeout: float, token: bool = True, tls: bool = True) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if _exited(self.state.pids.get(comp, -1)):
                raise errors.ClusterError(f"{comp} exited during start-up; see {self.dir / 'logs' / (comp + '.log')}:\n"
                                          + self.log_tail(comp))
            try:
                req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.state.token}"} if token else {})
                ctx = self._ssl() if tls else None
                if comp in ("kube-controller-manager", "kube-scheduler"):
                    ctx = ssl._create_unverified_context()  # self-signed serving certs on loopback
                with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError, ConnectionError) as exc:
                last = str(exc)
            time.sleep(0.3)
        raise errors.ClusterError(f"{comp} did not become healthy within {timeout:.0f}s ({last}); "
                                  f"see {self.dir / 'logs' / (comp + '.log')}")

    def log_tail(self, comp: str, lines: int = 15) -> str:
        path = self.dir / "logs" / f"{comp}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start_component(self, comp: str) -> None:
        """Start one component (if not running) and wait until it is healthy."""
        if _alive(self.state.pids.get(comp, -1), comp):
            return
        p = self.state.ports
        if comp == "kube-apiserver" and not wait_listenable(p.apiserver):
            log.warning("kube-apiserver's port %d is still held after 90 s; starting it anyway", p.apiserver)
        self._start(comp)
        if comp == "etcd":
            self._wait_http(comp, f"http://127.0.0.1:{p.etcd}/health", 60, token=False, tls=False)
        elif comp == "etcd-events":
            self._wait_http(comp, f"http://127.0.0.1:{p.etcd_events}/health", 60, token=False, tls=False)
        elif comp == "kube-apiserver":
            self._wait_http(comp, f"{self.server}/readyz", 120)
        elif comp == "kube-controller-manager":
            self._wait_http(comp, f"https://127.0.0.1:{p.controller_manager}/healthz", 60, token=False)
        elif comp == "kube-scheduler":
            self._wait_http(comp, f"https://127.0.0.1:{p.scheduler}/healthz", 60, token=False)
        elif comp == "kwok":
            self._wait_http(comp, f"http://127.0.0.1:{p.kwok}/healthz", 60, token=False, tls=False)

    def tune_scheduler(self, *, initial_backoff_seconds: int = 0, max_backoff_seconds: int = 0,
                       feature_gates: str = "", verbosity: int = 1) -> None:
        """Set kube-scheduler's backoff (0: its defaults, 1 s and 10 s), extra feature gates and log
        verbosity; a running scheduler is restarted with them (its queue is rebuilt from the API)."""
        st = self.state
        st.scheduler_initial_backoff_seconds, st.scheduler_max_backoff_seconds = initial_backoff_seconds, \
            max_backoff_seconds
        st.scheduler_feature_gates, st.scheduler_verbosity = feature_gates, verbosity
        if self.state_path.parent.exists():
            st.save(self.state_path)
        if "kube-scheduler" in st.pids:
            self.stop_component("kube-scheduler")
            self.start_component("kube-scheduler")

    def stop_component(self, comp: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        pid = self.state.pids.get(comp)
        if not pid or not _alive(pid, comp):
            self.state.pids.pop(comp, None)
            return
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not _gone(pid):
            time.sleep(0.1)
        if not _gone(pid):
            os.killpg(pid, signal.SIGKILL)
            end = time.monotonic() + 30  # SIGKILL cannot be ignored; its sockets close before it is a zombie
            while not _gone(pid) and time.monotonic() < end:
                time.sleep(0.05)
        self.state.pids.pop(comp, None)
        self.state.save(self.state_path)

    def start_processes(self, *, apiserver_port: int | None = None, events_etcd: bool = False,
                        real_node: bool = False, progress: Progress | None = None) -> None:
        say = progress or (lambda s: None)
        if not self.state.bin_dir or not Path(self.state.bin_dir, "kwok").exists():
            self.state.bin_dir = str(ensure_binaries(say))
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.state.events_etcd != events_etcd and any(self.running().values()):
            if events_etcd != self.state.events_etcd:
                say("events-etcd layout changed: restarting the API server")
                self.stop_component("kube-apiserver")
        self.state.events_etcd = events_etcd
        if apiserver_port and self.state.ports.apiserver and apiserver_port != self.state.ports.apiserver \
                and self.running().get("kube-apiserver"):
            raise errors.ClusterError(
                f"the cluster in {self.dir} already serves on port {self.state.ports.apiserver}; "
                f"run 'fleetkeeper cluster down' first to change it to {apiserver_port}")
        if real_node and not self.state.real_node and self.running().get("kube-apiserver"):
            raise errors.ClusterError(f"the cluster in {self.dir} runs without a real node; run 'fleetkeeper "
                                      "cluster down' first, then 'cluster up --real-node'")
        if real_node:
            from fleetkeeper.localcluster.realnode import host_ip

            self.state.real_node = True
            self.state.host_ip = self.state.host_ip or host_ip()
        self._choose_ports(apiserver_port)
        self._check_ports(self.running())
        pki.write_cluster_pki(self.dir / "pki", [self.state.host_ip] if self.state.real_node else [])
        self._write_auth()
        self.state.save(self.state_path)
        order = ["etcd"] + (["etcd-events"] if events_etcd else []) + [
            "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]
        for comp in order:
            if _alive(self.state.pids.get(comp, -1), comp):
                continue
            say(f"starting {comp}")
            self.start_component(comp)

    async def connect(self, **kw) -> Kube:
        return await Kube.connect(str(self.kubeconfig), **kw)

    async def up(self, nodes: int = 50, gpus_per_node: int = 8, *, apiserver_port: int | None = None,
                 events_etcd: bool = False, join_gate: bool = False, create_rate: float | None = None,
                 progress: Progress | None = None, wait_ready: bool = True, real_node: bool = False) -> dict:
        say = progress or (lambda s: None)
        await asyncio.to_thread(self.start_processes, apiserver_port=apiserver_port, events_etcd=events_etcd,
                                real_node=real_node, progress=say)
        self.state.gpus_per_node = gpus_per_node
        self.state.save(self.state_path)
        t0 = time.monotonic()
        async with await self.connect(retry=RetryPolicy(attempts=8)) as kube:
            spec = FleetSpec(nodes=nodes, gpus_per_node=gpus_per_node, join_gate=join_gate, ready=True)
            created = await create_nodes(kube, spec, rate=create_rate, progress=say)
            ready = await wait_nodes_ready(kube, nodes, timeout=max(300.0, nodes / 4), progress=say) if wait_ready else 0
            if real_node:
                await self.start_real_node(kube, say)
        return {"created": created, "ready": ready, "seconds": round(time.monotonic() - t0, 1)}

    # --- the real node ---------------------------------------------------------
    def real_node(self):
        from fleetkeeper.localcluster.realnode import RealNode

        pk = self.dir / "pki"
        t = self.state.node_tokens
        return RealNode(self.dir, server=self.server, ca_file=pk / "ca.crt", ca_key_file=pk / "ca.key",
                        node_token=t.get("node", ""), proxy_token=t.get("proxy", ""), dns_token=t.get("dns", ""))

    async def start_real_node(self, kube: Kube, progress: Progress | None = None, *,
                              images: list[Path] | None = None) -> None:
        """Build (or reuse) the node's binaries and the images, start the node, wait until it is Ready."""
        from fleetkeeper.localcluster.realnode import NODE_NAME, pause_archive

        say = progress or (lambda s: None)
        await apply_dns_rbac(kube)
        bin_dir = await asyncio.to_thread(ensure_realnode_binaries, say)
        archives = [await asyncio.to_thread(pause_archive, bin_dir)]
        archives += images if images is not None else await asyncio.to_thread(ensure_image_archives, self.dir, say)
        await asyncio.to_thread(self.real_node().start, bin_dir, archives, say)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            n = await kube.get_or_none(NODES, NODE_NAME)
            if n is not None and node_ready(n):
                say(f"real node {NODE_NAME} Ready")
                return
            await asyncio.sleep(1.0)
        raise errors.ClusterError(f"the real node did not become Ready in 180s; see {self.dir / 'realnode' / 'logs'}:\n"
                                  + self.real_node().log_tail("kubelet"))

    def down(self, purge: bool = False) -> list[str]:
        stopped = []
        if (self.dir / "realnode" / "state.json").exists():
            stopped += [f"{c} (real node)" for c in self.real_node().stop()]
        for comp in reversed(COMPONENTS):
            if self.state.pids.get(comp) and _alive(self.state.pids[comp], comp):
                stopped.append(comp)
            self.stop_component(comp)
        if purge and self.dir.exists():
            shutil.rmtree(self.dir)
        elif self.state_path.exists():
            self.state.save(self.state_path)
        return stopped


async def create_nodes(kube: Kube, spec: FleetSpec, *, rate: float | None = None, concurrency: int = 32,
                       progress: Progress | None = None, start: int = 0) -> int:
    """Create the fleet's nodes that do not exist yet; ``rate`` (nodes per second)
    paces registrations (R17). Returns how many were created."""
    existing, _ = await kube.list(NODES, label_selector=f"{KWOK_LABEL}={KWOK_LABEL_VALUE}")
    have = {n["metadata"]["name"] for n in existing}
    todo = [node_manifest(spec, i) for i in range(start, spec.nodes)]
    todo = [n for n in todo if n["metadata"]["name"] not in have]
    if not todo:
        return 0
    bucket = TokenBucket(rate, max(1, int(rate))) if rate else None
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(node: dict) -> None:
        nonlocal done
        if bucket:
            await bucket.acquire()
        async with sem:
            try:
                await kube.create(NODES, node)
            except errors.Conflict:
                pass
        done += 1
        if progress and (done % 500 == 0 or done == len(todo)):
            progress(f"nodes created: {done}/{len(todo)}")

    await asyncio.gather(*(one(n) for n in todo))
    return len(todo)


def node_ready(node: dict) -> bool:
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


async def wait_nodes_ready(kube: Kube, count: int, timeout: float = 300, progress: Progress | None = None) -> int:
    deadline = time.monotonic() + timeout
    last = -1
    ready = 0
    while time.monotonic() < deadline:
        nodes, _ = await kube.list(NODES, label_selector=f"{KWOK_LABEL}={KWOK_LABEL_VALUE}")
        ready = sum(1 for n in nodes if node_ready(n))
        if ready != last and progress:
            progress(f"nodes Ready: {ready}/{count}")
            last = ready
        if ready >= count:
            return ready
        await asyncio.sleep(1.0)
    raise errors.ClusterError(f"only {ready} of {count} nodes became Ready within {timeout:.0f}s (see logs/kwok.log)")
