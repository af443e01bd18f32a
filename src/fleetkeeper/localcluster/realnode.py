"""One real node beside the simulated ones: containerd 2.x, runc, a CNI bridge, a
kubelet, kube-proxy and a minimal CoreDNS on this machine, joined to the local
control plane (which then listens on the host's address, see
:meth:`LocalCluster._command`). Pods meant for it tolerate its taint
``fleetkeeper.io/real-node=true:NoSchedule`` and select its label of the same name.

Everything the node writes lives under ``<cluster dir>/realnode`` except what the
programs write elsewhere regardless of their settings; :meth:`RealNode.stop`
removes that too and restores the kernel settings the kubelet and kube-proxy
change, so the host is left as it was (docs/realnode.md lists each side effect).
Needs root. Only one real node may run on a machine (a lock file), and never beside
the network-namespace tests, which use the same iptables tables.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fleetkeeper.core import errors
from fleetkeeper.core.pki import cert_pem, make_leaf, write_key

log = logging.getLogger("fleetkeeper.localcluster.realnode")

NODE_NAME = "fleetkeeper-real-node"
TAINT_KEY = LABEL_KEY = "fleetkeeper.io/real-node"
POD_CIDR = "10.244.0.0/24"            # outside KWOK's 10.128.0.0/10 and the 10.96.0.0/16 services
CNI_NETWORK = "fleetkeeper-real-node"
CNI_BRIDGE = "fkreal0"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
PAUSE_IMAGE = "localhost/pause:fleetkeeper"
DNS_PORT = 53
LOCK = Path("/run/fleetkeeper-real-node.lock")
# Kernel settings changed by the kubelet (overcommit, panic), kube-proxy (route_localnet)
# and this lane (ip_forward): recorded at start, restored at stop.
SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward",
           "net.ipv4.conf.all.route_localnet")
# Written by containerd and the kubelet outside their configured directories.
HOST_PATHS = ("/run/containerd", "/var/lib/kubelet", "/var/log/pods", "/var/log/containers",
              f"/var/lib/cni/networks/{CNI_NETWORK}", "/var/lib/cni/results", "/var/lib/cni/networks",
              "/var/lib/cni", "/etc/cni/net.d/cni.lock")
COMPONENTS = ("containerd", "kubelet", "kube-proxy", "coredns")

Progress = Callable[[str], None]


def host_ip() -> str:
    """The address other hosts (and pods) reach this machine on: the source of its default route."""
    out = subprocess.run(["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True).stdout.split()
    if "src" in out:
        return out[out.index("src") + 1]
    raise errors.ClusterError("the real node needs an IPv4 default route (none found: 'ip -4 route get 1.1.1.1')")


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


@dataclass
class RealNodeState:
    host_ip: str = ""
    bin_dir: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)   # value before the lane started
    existed: list[str] = field(default_factory=list)         # HOST_PATHS that existed before
    netns_before: list[str] = field(default_factory=list)    # cni-* network namespaces of others
    chains_before: list[str] = field(default_factory=list)   # KUBE-*/CNI-* iptables chains of others

    @classmethod
    def load(cls, path: Path) -> "RealNodeState":
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))


class RealNode:
    def __init__(self, cluster_dir: Path, *, server: str, ca_file: Path, ca_key_file: Path,
                 node_token: str, proxy_token: str, dns_token: str):
        self.dir = cluster_dir / "realnode"
        self.server, self.ca_file, self.ca_key_file = server, ca_file, ca_key_file
        self.node_token, self.proxy_token, self.dns_token = node_token, proxy_token, dns_token
        self.state_path = self.dir / "state.json"
        self.state = RealNodeState.load(self.state_path)

    # --- paths --------------------------------------------------------------
    @property
    def sock(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    def _bin(self, name: str) -> str:
        return str(Path(self.state.bin_dir) / name)

    def _log(self, comp: str) -> Path:
        return self.dir / "logs" / f"{comp}.log"

    # --- checks -------------------------------------------------------------
    @staticmethod
    def check_host() -> None:
        problems = []
        if os.geteuid() != 0:
            problems.append("run as root (containerd, the kubelet and kube-proxy need it)")
        if not shutil.which("runc"):
            problems.append("runc is missing (make deps: Debian package runc)")
        if not any(Path(d, "bridge").exists() for d in CNI_BIN_DIRS):
            problems.append("the CNI plugins are missing (make deps: containernetworking-plugins)")
        if not shutil.which("iptables"):
            problems.append("iptables is missing (make deps)")
        if problems:
            raise errors.ClusterError("cannot start the real node: " + "; ".join(problems))

    def _lock(self) -> None:
        try:
            fd = os.open(LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = LOCK.read_text().strip()
            if owner and Path(owner) != self.dir and Path(owner, "state.json").exists():
                raise errors.ClusterError(
                    f"another real node runs on this machine ({owner}); only one may (stop it with "
                    f"'fleetkeeper cluster down' in its cluster directory, or remove {LOCK} if it is gone)") from None
            LOCK.write_text(str(self.dir))
            return
        with os.fdopen(fd, "w") as f:
            f.write(str(self.dir))

    # --- configuration --------------------------------------------------------
    def _kubeconfig(self, name: str, user: str, token: str) -> Path:
        import base64

        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        path = self.dir / f"{name}.kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: local\n  cluster:\n    server: https://{self.state.host_ip}:{self.server.rsplit(':', 1)[1]}\n"
            f"    certificate-authority-data: {ca}\n"
            f"users:\n- name: {user}\n  user:\n    token: {token}\n"
            "contexts:\n- name: local\n  context:\n    cluster: local\n    user: " + user + "\n"
            "current-context: local\n")
        path.chmod(0o600)
        return path

    def _write_configs(self) -> None:
        d = self.dir
        for sub in ("containerd/root", "containerd/state", "kubelet", "cni/net.d", "logs", "pki"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        cni_bins = [x for x in CNI_BIN_DIRS if Path(x, "bridge").exists()]
        (d / "containerd" / "config.toml").write_text(f"""version = 3
root = "{d / 'containerd/root'}"
state = "{d / 'containerd/state'}"

[grpc]
  address = "{self.sock}"

[plugins.'io.containerd.cri.v1.runtime']
  # the VM refuses oom_score_adj -998 for the sandbox: without this every sandbox fails
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = {json.dumps(cni_bins)}
    conf_dir = "{d / 'cni/net.d'}"
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc')}"
        SystemdCgroup = false

[plugins.'io.containerd.cri.v1.images']
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
""")
        (d / "cni" / "net.d" / "10-fleetkeeper.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": CNI_NETWORK,
            "plugins": [
                {"type": "bridge", "bridge": CNI_BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(d / "cni" / "ipam")}},
                {"type": "loopback"},
            ]}, indent=2))
        # the kubelet's serving certificate, signed by the cluster CA
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca_cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key_file.read_bytes(), None)
        key, cert = make_leaf(ca_key, ca_cert, f"system:node:{NODE_NAME}", [NODE_NAME, self.state.host_ip],
                              organization="system:nodes")
        write_key(d / "pki" / "kubelet.key", key)
        (d / "pki" / "kubelet.crt").write_bytes(cert_pem(cert))
        kubelet_kc = self._kubeconfig("kubelet", f"system:node:{NODE_NAME}", self.node_token)
        (d / "kubelet.yaml").write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {self.ca_file}}}
authorization: {{mode: Webhook}}
tlsCertFile: {d / 'pki' / 'kubelet.crt'}
tlsPrivateKeyFile: {d / 'pki' / 'kubelet.key'}
containerRuntimeEndpoint: unix://{self.sock}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
clusterDNS: [{self.state.host_ip}]
clusterDomain: cluster.local
podCIDR: {POD_CIDR}
maxPods: 30
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
registerWithTaints:
- {{key: {TAINT_KEY}, value: "true", effect: NoSchedule}}
# a shared, busy disk must not evict the lane's pods or garbage-collect its images
evictionHard: {{memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
enforceNodeAllocatable: []
cgroupsPerQOS: true
localStorageCapacityIsolation: false
serializeImagePulls: false
""")
        self._kubelet_kc = kubelet_kc
        proxy_kc = self._kubeconfig("kube-proxy", "system:kube-proxy", self.proxy_token)
        (d / "kube-proxy.yaml").write_text(f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {proxy_kc}}}
mode: iptables
clusterCIDR: {POD_CIDR}
hostnameOverride: {NODE_NAME}
bindAddress: {self.state.host_ip}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
# pods reach Services on the same bridge without br_netfilter: every Service hop is masqueraded
iptables: {{masqueradeAll: true}}
conntrack: {{maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")
        dns_kc = self._kubeconfig("coredns", "fleetkeeper:coredns", self.dns_token)
        (d / "Corefile").write_text(f""".:{DNS_PORT} {{
    errors
    health 127.0.0.1:18080
    ready 127.0.0.1:18181
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {dns_kc} local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 30
    loadbalance
}}
""")

    def _command(self, comp: str) -> list[str]:
        d = self.dir
        if comp == "containerd":
            return [self._bin("containerd"), f"--config={d / 'containerd' / 'config.toml'}", "--log-level=warn"]
        if comp == "kubelet":
            return [self._bin("kubelet"), f"--config={d / 'kubelet.yaml'}", f"--kubeconfig={d / 'kubelet.kubeconfig'}",
                    f"--root-dir={d / 'kubelet'}", f"--hostname-override={NODE_NAME}",
                    f"--node-ip={self.state.host_ip}", f"--node-labels={LABEL_KEY}=true", "--v=1"]
        if comp == "kube-proxy":
            return [self._bin("kube-proxy"), f"--config={d / 'kube-proxy.yaml'}", "--v=1"]
        if comp == "coredns":
            return [self._bin("coredns"), "-conf", str(d / "Corefile")]
        raise ValueError(comp)

    def _start(self, comp: str) -> None:
        self._log(comp).parent.mkdir(parents=True, exist_ok=True)
        cmd = self._command(comp)
        env = dict(os.environ)
        env["PATH"] = f"{self.state.bin_dir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        fd = os.open(self._log(comp), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            pid = os.posix_spawn(cmd[0], cmd, env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)])
        finally:
            os.close(fd)
        self.state.pids[comp] = pid
        self.state.save(self.state_path)
        from fleetkeeper.localcluster.cluster import _reap_later

        _reap_later(pid)

    def _alive(self, comp: str) -> bool:
        from fleetkeeper.localcluster.cluster import _alive

        pid = self.state.pids.get(comp)
        return bool(pid) and _alive(pid, comp)

    def log_tail(self, comp: str, lines: int = 20) -> str:
        p = self._log(comp)
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    def _wait(self, comp: str, ok: Callable[[], bool], timeout: float) -> None:
        from fleetkeeper.localcluster.cluster import _exited

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _exited(self.state.pids.get(comp, -1)):  # (just started: it may not have exec'd its binary yet)
                raise errors.ClusterError(f"{comp} of the real node exited; {self._log(comp)}:\n{self.log_tail(comp)}")
            if ok():
                return
            time.sleep(0.3)
        raise errors.ClusterError(f"{comp} of the real node not ready in {timeout:.0f}s; see {self._log(comp)}")

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([self._bin("ctr"), f"--address={self.sock}", "--namespace=k8s.io", *args],
                              capture_output=True, text=True, check=check, timeout=timeout)

    def load_image(self, archive: Path) -> None:
        """Import an OCI archive (buildah push IMAGE oci-archive:FILE:IMAGE) into the node's containerd."""
        r = self.ctr("images", "import", "--no-unpack=false", str(archive), check=False)
        if r.returncode != 0:
            raise errors.ClusterError(f"ctr images import {archive}: {r.stderr.strip()}")

    # --- lifecycle -------------------------------------------------------------
    def start(self, bin_dir: Path, images: list[Path], progress: Progress | None = None) -> None:
        say = progress or (lambda s: None)
        self.check_host()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        st = self.state
        st.bin_dir = str(bin_dir)
        if not st.host_ip:
            st.host_ip = host_ip()
        if not st.sysctls:  # first start: remember the host as it was
            st.sysctls = {k: sysctl_path(k).read_text().strip() for k in SYSCTLS if sysctl_path(k).exists()}
            st.existed = [p for p in HOST_PATHS if Path(p).exists()]
            st.netns_before = sorted(p.name for p in Path("/run/netns").glob("cni-*")) \
                if Path("/run/netns").exists() else []
            st.chains_before = sorted(iptables_chains())
        st.save(self.state_path)
        sysctl_path("net.ipv4.ip_forward").write_text("1\n")
        self._write_configs()
        if not self._alive("containerd"):
            say("starting containerd (real node)")
            self._start("containerd")
            self._wait("containerd", lambda: self.sock.exists() and self.ctr("version", check=False).returncode == 0, 60)
        for archive in images:
            say(f"loading {archive.name} into the real node's containerd")
            self.load_image(archive)
        for comp in ("kubelet", "kube-proxy", "coredns"):
            if not self._alive(comp):
                say(f"starting {comp} (real node)")
                self._start(comp)
        self._wait("coredns", lambda: _http_ok("http://127.0.0.1:18080/health"), 60)
        self._wait("kubelet", lambda: _http_ok("http://127.0.0.1:10248/healthz"), 120)
        self._wait("kube-proxy", lambda: _http_ok("http://127.0.0.1:10256/healthz"), 60)

    def stop(self) -> list[str]:
        """Stop every process of the node and undo what they did to the host."""
        stopped = []
        for comp in ("coredns", "kube-proxy", "kubelet"):
            if self._stop(comp):
                stopped.append(comp)
        if self._alive("containerd"):
            self._kill_containers()
        if self._stop("containerd"):
            stopped.append("containerd")
        self._cleanup_host()
        if LOCK.exists() and LOCK.read_text().strip() == str(self.dir):
            LOCK.unlink()
        return stopped

    def _stop(self, comp: str, timeout: float = 20) -> bool:
        pid = self.state.pids.get(comp)
        if not pid or not self._alive(comp):
            self.state.pids.pop(comp, None)
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(comp):
            time.sleep(0.1)
        if self._alive(comp):
            os.killpg(pid, signal.SIGKILL)
        self.state.pids.pop(comp, None)
        self.state.save(self.state_path)
        return True

    def _kill_containers(self) -> None:
        tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
        for t in tasks:
            self.ctr("tasks", "kill", "-s", "SIGKILL", "--all", t, check=False, timeout=30)
        deadline = time.monotonic() + 30
        for t in tasks:
            while time.monotonic() < deadline and self.ctr("tasks", "rm", "-f", t, check=False).returncode != 0:
                time.sleep(0.3)
        for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "rm", c, check=False)

    def _cleanup_host(self) -> None:
        # shims outlive containerd: kill those of this node (they name its socket)
        sock = str(self.sock)
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if "containerd-shim" in cmd and (sock in cmd or str(self.dir) in cmd):
                    try:
                        os.kill(int(proc.name), signal.SIGKILL)
                    except OSError:
                        pass
        # pod network namespaces and the bridge
        for ns in Path("/run/netns").glob("cni-*") if Path("/run/netns").exists() else []:
            if ns.name not in self.state.netns_before:
                subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True)
        for f in Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*") if Path("/var/lib/cni/results").exists() else []:
            f.unlink(missing_ok=True)
        subprocess.run(["ip", "link", "delete", CNI_BRIDGE], capture_output=True)
        # kube-proxy's KUBE-* chains and its route_localnet
        if self.state.bin_dir and Path(self._bin("kube-proxy")).exists():
            subprocess.run([self._bin("kube-proxy"), "--cleanup", "--v=0"], capture_output=True, timeout=120)
        # what kube-proxy --cleanup leaves: the kubelet's KUBE-FIREWALL, canaries and hints, CNI chains
        remove_chains(set(iptables_chains()) - set(self.state.chains_before))
        # mounts left under the node's directories (rootfs, shm, secrets, projected tokens)
        roots = (str(self.dir), "/run/containerd", "/var/lib/kubelet")
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(roots)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        # the kubelet's and containerd's paths outside their configured directories
        existed = set(self.state.existed)
        for p in HOST_PATHS:
            path = Path(p)
            if p not in existed and path.exists():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        # cgroups of the pods (cgroup v1: one tree per controller; v2: one)
        for base in Path("/sys/fs/cgroup").glob("*/kubepods*") if Path("/sys/fs/cgroup").exists() else []:
            _rmdir_tree(base)
        for base in Path("/sys/fs/cgroup").glob("kubepods*"):
            _rmdir_tree(base)
        # kernel settings, as they were
        for k, v in self.state.sysctls.items():
            try:
                sysctl_path(k).write_text(v + "\n")
            except OSError as exc:
                log.warning("could not restore %s=%s: %s", k, v, exc)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


def _rmdir_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def pause_archive(bin_dir: Path) -> Path:
    """The sandbox ("pause") image as an OCI archive, made once from the built pause
    binary with buildah (no registry to pull it from)."""
    out = bin_dir / "pause.oci.tar"
    if out.exists():
        return out
    if not shutil.which("buildah"):
        raise errors.ClusterError("buildah is missing (make deps): it makes the pause image")
    run = lambda *a: subprocess.run(["buildah", *a], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    c = run("from", "scratch")
    try:
        run("copy", c, str(bin_dir / "pause"), "/pause")
        run("config", "--entrypoint", '["/pause"]', c)
        run("commit", "--quiet", c, PAUSE_IMAGE)
    finally:
        subprocess.run(["buildah", "rm", c], capture_output=True)
    tmp = out.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run("push", "--quiet", PAUSE_IMAGE, f"oci-archive:{tmp}:{PAUSE_IMAGE}")
    tmp.replace(out)
    return out


CHAIN_PREFIXES = ("KUBE-", "CNI-")


def iptables_chains() -> list[str]:
    """``"<tool> <table> <chain>"`` for every KUBE-*/CNI-* chain (IPv4 and IPv6)."""
    out = []
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(f"{tool}-save"):
            continue
        table = ""
        dump = subprocess.run([f"{tool}-save"], capture_output=True, text=True).stdout
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and line[1:].startswith(CHAIN_PREFIXES):
                out.append(f"{tool} {table} {line[1:].split()[0]}")
    return out


def remove_chains(chains: set[str]) -> None:
    """Delete these chains and every rule that jumps to them."""
    if not chains:
        return
    by_table: dict[tuple[str, str], set[str]] = {}
    for c in chains:
        tool, table, name = c.split()
        by_table.setdefault((tool, table), set()).add(name)
    for (tool, table), names in by_table.items():
        dump = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True).stdout
        for line in dump.splitlines():
            parts = shlex.split(line)
            if line.startswith("-A ") and "-j" in parts and parts[parts.index("-j") + 1] in names \
                    and parts[1] not in names:
                subprocess.run([tool, "-t", table, "-D", *parts[1:]], capture_output=True)
        for name in names:
            subprocess.run([tool, "-t", table, "-F", name], capture_output=True)
        for name in names:
            subprocess.run([tool, "-t", table, "-X", name], capture_output=True)
