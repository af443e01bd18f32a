"""The Helm chart installed for real: a local control plane with a few KWOK nodes and one
real node (kubelet, containerd, runc, CNI bridge, kube-proxy, CoreDNS) on this machine,
fleetkeeper's images loaded into its containerd. Every fleetkeeper pod becomes Ready
through its real probes; the webhooks answer through their Services; a leader's death,
a certificate rotation and an upgrade open no window; uninstall leaves nothing behind.

Runs when FLEETKEEPER_REAL_NODE=1 (root; one real-node lane per machine, never beside
tests/netns): `make test` as root sets it, or run this file alone with pytest and it set.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from fleetkeeper.core import errors
from fleetkeeper.core.kube import (
    CLUSTERROLEBINDINGS, CLUSTERROLES, CONFIGMAPS, LEASES, MUTATING_WEBHOOKS, NAMESPACES, NODES, PODS, SECRETS,
    SERVICES, SUBJECT_ACCESS_REVIEWS, VALIDATING_WEBHOOKS, Kube, Resource,
)
from fleetkeeper.localcluster.cluster import LocalCluster
from fleetkeeper.localcluster.realnode import LABEL_KEY, NODE_NAME, TAINT_KEY

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "chart"))
from chartlib import CHART, helm, helm_binary  # noqa: E402

if os.environ.get("FLEETKEEPER_REAL_NODE") != "1":
    pytest.skip("the real-node lane runs with FLEETKEEPER_REAL_NODE=1 (root; alone on the machine)",
                allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("the real-node lane needs root", allow_module_level=True)

# the first test also starts the lane (cluster, real node, images when their sources changed)
pytestmark = pytest.mark.timeout(1800)
NS = "fleetkeeper-system"
RELEASE = "fleetkeeper"
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True)
# The lane has one real node: the controllers run there even while it is quarantined (the
# kernel log of this boot keeps every Xid line an earlier run of these tests wrote).
ON_REAL_NODE = {"nodeSelector": {LABEL_KEY: "true"},
                "tolerations": [{"key": TAINT_KEY, "operator": "Equal", "value": "true", "effect": "NoSchedule"},
                                {"key": "fleetkeeper.io/quarantine", "operator": "Exists", "effect": "NoSchedule"}]}
VALUES = {
    "manager": {**ON_REAL_NODE, "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}},
    "health": {"agent": {"nodeSelector": {LABEL_KEY: "true"},
                         "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}},
               # an Xid error quarantines (and nothing more: the lane's own pods run on this node)
               "policy": {"node_selector": {LABEL_KEY: "true"},
                          "rules": [{"type": "GPUXidError", "reason": "*", "remedy": "investigate",
                                     "action": "quarantine"}],
                          "budget": {"cluster": {"max_nodes": 5}, "zone": {"max_nodes": 5},
                                     "rack": {"max_nodes": 5}},
                          "storm": {"min_nodes": 50}}},
    "teams": {"config": {"teams": [], "membership": {"team-a": {"groups": ["team-a"]},
                                                     "team-b": {"groups": ["team-b"]}}},
              # the upgrade and failover tests hammer admission while pods roll: a call that outlasts the
              # chart's 2 s (a loaded 2-core machine) skips the mutator (Ignore) and the validator refuses
              # the unstamped pod, a verdict on speed, not on the roll; 10 s is the API server's default
              "webhook": {"timeoutSeconds": 10}},
    "preflight": {"config": {"node_selector": {"fleetkeeper.io/realnode-test": "gate"},
                             "periodic": {"enabled": False}}},
    # the caching relay (2 replicas behind the fleetkeeper-relay Service), its open-file limit
    # checked against 10 agents
    "relay": {"enabled": True, "expectedAgents": 10},
}


async def until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def values_file(extra: dict | None = None) -> str:
    import copy

    v = copy.deepcopy(VALUES)
    for k, val in (extra or {}).items():
        v.setdefault(k, {}).update(val)
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    with f:
        yaml.safe_dump(v, f)
    return f.name


def host_snapshot() -> dict:
    """What the lane may change on the host and must restore."""
    from fleetkeeper.localcluster.realnode import CNI_BRIDGE, HOST_PATHS, SYSCTLS, iptables_chains, sysctl_path

    return {"sysctls": {k: sysctl_path(k).read_text().strip() for k in SYSCTLS},
            "paths": sorted(p for p in HOST_PATHS if Path(p).exists()),
            "chains": sorted(iptables_chains()),
            "bridge": subprocess.run(["ip", "link", "show", CNI_BRIDGE], capture_output=True).returncode == 0,
            "netns": sorted(p.name for p in Path("/run/netns").glob("cni-*")) if Path("/run/netns").exists() else [],
            "kubepods": sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods*")),
            "shims": sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and b"containerd-shim" in
                         _read(p / "cmdline")),
            "lock": Path("/run/fleetkeeper-real-node.lock").exists()}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def real_cluster():
    helm_binary()  # skip early when helm is not built
    before = host_snapshot()
    lc = LocalCluster(Path(tempfile.mkdtemp(prefix="fk-realnode-")))
    try:
        asyncio.run(lc.up(4, 8, real_node=True))
        yield lc
    finally:
        lc.down(purge=True)
    # teardown leaves the host as it was
    assert host_snapshot() == before


@pytest.fixture
async def kube(real_cluster):
    k = await real_cluster.connect()
    yield k
    await k.close()


def helm_in(lc: LocalCluster, *args: str, check: bool = True):
    """helm against the lane's cluster; when it fails, what the release's pods were doing is
    printed (status, events, every container's log and its previous run's) so the failure
    explains itself."""
    try:
        return helm("--kubeconfig", str(lc.kubeconfig), *args, check=check, timeout=480)
    except (AssertionError, subprocess.TimeoutExpired):
        print(release_diagnostics(lc))
        raise


def release_diagnostics(lc: LocalCluster) -> str:
    """The release's pods, Services, endpoints and Events; for every pod that is not Ready or
    has restarted, `kubectl describe` and each container's log, its previous run's too."""
    def kubectl(*args: str) -> str:
        r = subprocess.run([lc._bin("kubectl"), f"--kubeconfig={lc.kubeconfig}", "-n", NS, *args],
                           capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr

    def shown(*args: str) -> str:
        return f"$ kubectl -n {NS} {' '.join(args)}\n{kubectl(*args)}"
    out = [shown("get", "pods,services,endpointslices", "-o", "wide"),
           shown("get", "events", "--sort-by=.lastTimestamp")]
    try:
        pods = yaml.safe_load(kubectl("get", "pods", "-l", "app.kubernetes.io/name=fleetkeeper", "-o", "json"))["items"]
    except (TypeError, KeyError, yaml.YAMLError):
        pods = []
    for p in pods:
        if ready(p) and all(c["restartCount"] == 0 for c in p["status"].get("containerStatuses") or []):
            continue
        name = f"pod/{p['metadata']['name']}"
        out += [shown("describe", name), shown("logs", name, "--all-containers", "--tail=200"),
                shown("logs", name, "--all-containers", "--previous", "--tail=200")]
    return "\n".join(out)


async def fleetkeeper_pods(kube: Kube) -> list[dict]:
    pods, _ = await kube.list(PODS, NS, label_selector="app.kubernetes.io/name=fleetkeeper")
    return pods


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (pod.get("status") or {}).get("conditions") or [])


async def test_install_every_pod_ready_through_its_probes(real_cluster, kube):
    t0 = time.monotonic()
    helm_in(real_cluster, "install", RELEASE, str(CHART), "--namespace", NS, "--create-namespace",
            "-f", values_file(), "--wait", "--timeout", "6m")
    # helm's --wait counts a DaemonSet ready once NumberReady >= desired - maxUnavailable: with one node and
    # maxUnavailable 10% (rounded up to 1) that is 0, so the agent may still be starting when helm returns
    async def all_ready():
        pods = await fleetkeeper_pods(kube)
        return pods if len(pods) == 9 and all(ready(p) for p in pods) else None
    try:
        await until(all_ready, 180, "every fleetkeeper pod Ready")
    except AssertionError:
        pass  # the assertions below say which pod
    pods = await fleetkeeper_pods(kube)
    names = sorted(p["metadata"]["name"] for p in pods)
    assert len(pods) == 9, names  # 2 x (preflight, health, teams, relay) + the agent on the real node
    for p in pods:
        assert p["spec"]["nodeName"] == NODE_NAME, (p["metadata"]["name"], p["spec"]["nodeName"])
        assert ready(p), p["metadata"]["name"]
        # Ready through real probes: the kubelet called /readyz on the pod's address
        c = p["spec"]["containers"][0]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert all(s["restartCount"] == 0 for s in p["status"]["containerStatuses"]), p["metadata"]["name"]
    print(f"helm install --wait: {time.monotonic() - t0:.0f}s")


def http_get(url: str) -> tuple[int, bytes]:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with direct.open(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:
        return 0, str(exc).encode()


async def test_relay_serves_the_real_nodes_pods_through_its_service(real_cluster, kube):
    """What a node agent reads (netacct's --relay): from this host, through the Service's
    cluster IP (kube-proxy), the relay answers /readyz and serves the real node's pods with
    their addresses, as the API server has them. Each replica's open-file limit holds
    relay.expectedAgents (2 x 10 + 1024 descriptors)."""
    svc = await kube.get(SERVICES, "fleetkeeper-relay", NS)
    base = f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"
    try:
        status, body = await asyncio.to_thread(http_get, f"{base}/readyz")
        assert status == 200, (status, body)

        async def same_pods():
            # (a hostNetwork pod's address is its node's: the relay gives agents none for it)
            want = {(p["metadata"]["name"], "" if p["spec"].get("hostNetwork") else p["status"].get("podIP"))
                    for p in await fleetkeeper_pods(kube)}
            status, body = await asyncio.to_thread(http_get, f"{base}/v1/nodes/{NODE_NAME}/pods")
            if status != 200:
                return None
            got = {(i["name"], i["ip"]) for i in yaml.safe_load(body)["items"]
                   if i["namespace"] == NS and i["labels"].get("app.kubernetes.io/name") == "fleetkeeper"}
            return got if got == want else None
        await until(same_pods, 60, "the relay's pods of the real node to be the API server's")

        relays = [p for p in await fleetkeeper_pods(kube)
                  if p["metadata"]["labels"].get("app.kubernetes.io/component") == "relay"]
        assert len(relays) == 2, [p["metadata"]["name"] for p in relays]
        for p in relays:
            status, body = await asyncio.to_thread(http_get, f"http://{p['status']['podIP']}:8080/metrics")
            assert status == 200, (p["metadata"]["name"], status)
            metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.decode().splitlines()
                       if line.startswith("fleetkeeper_relay_") and " " in line}
            assert metrics["fleetkeeper_relay_open_files_limit"] >= 2 * 10 + 1024, metrics
    except AssertionError:
        print(release_diagnostics(real_cluster))
        raise


async def _user(lc: LocalCluster, user: str) -> Kube:
    return await Kube.connect(str(lc.user_kubeconfig(user)))


@pytest.fixture
async def workspace(kube):
    ns = f"rn-{secrets.token_hex(3)}"
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    await kube.create(ROLEBINDINGS, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "researchers-edit", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "researchers"}]}, ns)

    async def bound():
        # the API server authorizes from its RBAC cache: a RoleBinding just created can still be missing there
        # (a researcher's first call was refused 403 once); a SubjectAccessReview asks that same cache
        review = await kube.create(SUBJECT_ACCESS_REVIEWS, {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "alice", "groups": ["researchers", "system:authenticated"],
                     "resourceAttributes": {"namespace": ns, "verb": "create", "resource": "pods"}}})
        return bool(review["status"].get("allowed"))
    await until(bound, 60, f"researchers allowed to create pods in {ns}")
    yield ns
    await kube.delete(NAMESPACES, ns)


def pod(ns: str, tolerations: list | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "w-", "namespace": ns},
            "spec": {"containers": [{"name": "c", "image": "localhost/fleetkeeper:0.1.0"}],
                     "tolerations": tolerations or []}}


TEAM_A = {"key": "fleetkeeper.io/team", "operator": "Equal", "value": "team-a", "effect": "NoSchedule"}


async def admit(user: Kube, ns: str, tolerations=None) -> dict:
    return await user.create(PODS, pod(ns, tolerations), ns, dry_run=True)


async def test_teams_webhook_through_its_service(real_cluster, workspace):
    alice, mallory = await _user(real_cluster, "alice"), await _user(real_cluster, "mallory")
    try:
        got = await admit(alice, workspace)
        assert any(t.get("value") == "team-a" for t in got["spec"].get("tolerations") or []), got["spec"]
        with pytest.raises(errors.ApiError) as exc:
            await admit(mallory, workspace, [TEAM_A])
        assert "team" in str(exc.value).lower()
    finally:
        await alice.close()
        await mallory.close()


async def test_preflight_gate_through_its_service(real_cluster, kube):
    from fleetkeeper.core.domain import Names
    from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest

    node = node_manifest(FleetSpec(nodes=1, cpu_fraction=0.0, prefix=f"rn{secrets.token_hex(2)}"), 0, Names())
    node["metadata"]["labels"]["fleetkeeper.io/realnode-test"] = "gate"
    try:
        created = await kube.create(NODES, node)
        taints = [t["key"] for t in created["spec"].get("taints") or []]
        assert "fleetkeeper.io/preflight" in taints, taints
    finally:
        try:
            await kube.delete(NODES, node["metadata"]["name"])
        except errors.NotFound:
            pass


async def _leader(kube: Kube, component: str) -> str:
    lease = await kube.get(LEASES, f"fleetkeeper-{component}", NS)
    return lease["spec"]["holderIdentity"]


async def _hammer(user: Kube, ns: str, stop: asyncio.Event, failures: list, count: list) -> None:
    """Admission calls through the teams webhook until stopped; every one must be answered."""
    while not stop.is_set():
        try:
            got = await admit(user, ns)
            if not any(t.get("value") == "team-a" for t in got["spec"].get("tolerations") or []):
                failures.append("admitted without its team toleration")
        except errors.FleetkeeperError as exc:
            failures.append(str(exc))
        count[0] += 1
        await asyncio.sleep(0.05)


async def test_leader_pod_deleted_standby_takes_over_no_failed_call(real_cluster, kube, workspace):
    alice = await _user(real_cluster, "alice")
    stop, failures, count = asyncio.Event(), [], [0]
    hammer = asyncio.create_task(_hammer(alice, workspace, stop, failures, count))
    try:
        leader = await _leader(kube, "teams")
        pods = [p for p in await fleetkeeper_pods(kube)
                if p["metadata"]["labels"].get("app.kubernetes.io/component") == "teams"]
        victim = next(p for p in pods if leader.startswith(p["metadata"]["name"]))
        await kube.delete(PODS, victim["metadata"]["name"], NS)

        async def new_leader():
            who = await _leader(kube, "teams")
            return who if not who.startswith(victim["metadata"]["name"]) else None
        await until(new_leader, 120, "the standby to take the lease")

        async def two_ready():
            ps = [p for p in await fleetkeeper_pods(kube)
                  if p["metadata"]["labels"].get("app.kubernetes.io/component") == "teams"]
            return len(ps) == 2 and all(ready(p) for p in ps)
        await until(two_ready, 180, "the replacement replica Ready")
    finally:
        stop.set()
        await hammer
        await alice.close()
    assert count[0] > 10
    assert not failures, failures[:5]


async def test_rotated_certificate_reaches_new_connections_without_restart(real_cluster, kube):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fleetkeeper.core.pki import cert_pem, key_pem, make_leaf

    ca = await kube.get(SECRETS, "fleetkeeper-webhook-ca", NS)
    ca_cert = x509.load_pem_x509_certificate(base64.b64decode(ca["data"]["tls.crt"]))
    ca_key = serialization.load_pem_private_key(base64.b64decode(ca["data"]["tls.key"]), None)
    hosts = [f"fleetkeeper-{c}-webhook.{NS}.svc" for c in ("preflight", "teams", "capacity")]
    key, leaf = make_leaf(ca_key, ca_cert, "fleetkeeper-webhook-rotated", hosts, days=30)
    before = {p["metadata"]["uid"]: p for p in await fleetkeeper_pods(kube)
              if p["metadata"]["labels"].get("app.kubernetes.io/component") == "teams"}
    await kube.patch(SECRETS, "fleetkeeper-webhook-tls", {"data": {
        "tls.crt": base64.b64encode(cert_pem(leaf)).decode(), "tls.key": base64.b64encode(key_pem(key)).decode()}}, NS)

    def served(ip: str) -> int:
        ctx = ssl.create_default_context(cadata=cert_pem(ca_cert).decode())
        ctx.check_hostname = False
        import socket

        with socket.create_connection((ip, 9443), timeout=5) as s, ctx.wrap_socket(s) as t:
            return x509.load_der_x509_certificate(t.getpeercert(binary_form=True)).serial_number

    async def all_rotated():
        serials = [await asyncio.to_thread(served, p["status"]["podIP"]) for p in before.values()]
        return all(s == leaf.serial_number for s in serials)
    await until(all_rotated, 240, "every teams replica serving the new certificate (kubelet sync + reload)")
    after = {p["metadata"]["uid"]: p for p in await fleetkeeper_pods(kube)
             if p["metadata"]["labels"].get("app.kubernetes.io/component") == "teams"}
    assert set(after) == set(before), "a replica was replaced"
    assert all(s["restartCount"] == 0 for p in after.values() for s in p["status"]["containerStatuses"])


async def test_upgrade_rolls_with_no_unguarded_admission(real_cluster, kube, workspace):
    alice = await _user(real_cluster, "alice")
    stop, failures, count = asyncio.Event(), [], [0]
    hammer = asyncio.create_task(_hammer(alice, workspace, stop, failures, count))
    try:
        before = {p["metadata"]["name"] for p in await fleetkeeper_pods(kube)}
        await asyncio.to_thread(helm_in, real_cluster, "upgrade", RELEASE, str(CHART), "--namespace", NS,
                                "-f", values_file(), "--set", "logLevel=debug",
                                "--wait", "--timeout", "6m")
        after = {p["metadata"]["name"] for p in await fleetkeeper_pods(kube)}
        assert after - before, "nothing rolled"
    finally:
        stop.set()
        await hammer
        await alice.close()
    assert count[0] > 10
    assert not failures, failures[:5]


async def test_health_agent_reads_the_real_node_and_a_kernel_fault_quarantines_it(kube):
    """The agent pod reads the host's real /proc, disks and kernel log and writes the real node's
    conditions; an Xid line written to the real /dev/kmsg becomes a condition, and the
    health controller (another pod) quarantines the node."""
    async def conditions():
        n = await kube.get(NODES, NODE_NAME)
        return {c["type"]: c for c in n["status"]["conditions"]}
    conds = await until(lambda: _has(conditions, "DiskUnhealthy"), 120, "the agent's first report")
    # the host's own mount table (not the container's read-only overlay): the disks are fine
    assert conds["DiskUnhealthy"]["status"] == "False", conds["DiskUnhealthy"]
    pci = f"PCI:0000:{secrets.token_hex(1)}:{secrets.token_hex(1)}.0"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"NVRM: Xid ({pci}): 79, pid=1, name=fleetkeeper-e2e, GPU has fallen off the bus.\n")

    async def xid():  # (the message names the first device per Xid code seen in this boot)
        c = (await conditions()).get("GPUXidError")
        return c if c and c["status"] == "True" else None
    found = await until(xid, 120, "GPUXidError=True from the real kernel log")
    assert "Xid79" in found["reason"], found

    async def quarantined():
        n = await kube.get(NODES, NODE_NAME)
        return [t for t in n["spec"].get("taints") or [] if t["key"] == "fleetkeeper.io/quarantine"]
    await until(quarantined, 120, "the real node quarantined by the health controller")


async def _has(conditions, type_):
    c = await conditions()
    return c if type_ in c else None


async def test_uninstall_leaves_nothing_behind(real_cluster, kube):
    helm_in(real_cluster, "uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", "3m")
    sel = "app.kubernetes.io/name=fleetkeeper"

    async def pods_gone():
        return not await fleetkeeper_pods(kube)
    await until(pods_gone, 120, "every fleetkeeper pod gone")
    for res in (MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS, CLUSTERROLES, CLUSTERROLEBINDINGS):
        items, _ = await kube.list(res, label_selector=sel)
        assert not items, [i["metadata"]["name"] for i in items]
    for res in (CONFIGMAPS, SECRETS):
        items, _ = await kube.list(res, NS, label_selector=sel)
        # documented to stay: the report signing key (helm.sh/resource-policy: keep)
        assert [i["metadata"]["name"] for i in items] in ([], ["fleetkeeper-preflight-key"]), items
    # documented to stay: what the controllers wrote on nodes (the quarantine of the previous test,
    # conditions) is state about the machines, not fleetkeeper objects; docs/helm.md says how to clear it
