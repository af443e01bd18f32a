"""The Helm chart without a cluster: lint, values schema, what it renders (labels the
scrape job selects, no simulator-only defaults, the manager's HA shape, least
privilege) and its webhook configurations matching what the components register."""

from __future__ import annotations

import base64
import filecmp
import tomllib

import pytest
import yaml

from chartlib import ALL_OPTIONS, CHART, NAMESPACE, ROOT, by_kind, helm, render, values_args

from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.controller import webhook_registration
from fleetkeeper.core.domain import Names
from fleetkeeper.preflight.config import WebhookConfig
from fleetkeeper.preflight.webhook import gate_registration
from fleetkeeper.teams.options import WebhookOptions
from fleetkeeper.teams.serve import registrations


def test_versions_follow_the_package():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == version and chart["appVersion"] == version


def test_prometheus_rules_are_the_monitoring_packs():
    for f in (CHART / "rules").iterdir():
        assert filecmp.cmp(f, ROOT / "deploy" / "monitoring" / "rules" / f.name, shallow=False), f.name


@pytest.mark.parametrize("values", [None, ALL_OPTIONS], ids=["defaults", "every-option"])
def test_lint(values):
    helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_args(values))


@pytest.mark.parametrize("bad,what", [
    ({"health": {"agent": {"gpu": "cuda"}}}, "gpu"),
    ({"manager": {"replicas": 0}}, "replicas"),
    ({"domain": "Not A Domain"}, "domain"),
    ({"teams": {"webhook": {"validatingFailurePolicy": "Maybe"}}}, "validatingFailurePolicy"),
    ({"heatlh": {"enabled": False}}, "heatlh"),  # a typo must not pass silently
])
def test_schema_rejects_bad_values(bad, what):
    r = helm("template", "x", str(CHART), *values_args(bad), check=False)
    assert r.returncode != 0 and what in r.stderr, r.stderr


def _pods(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            yield d["metadata"]["name"], d["spec"]["template"]


def test_every_pod_is_selected_by_the_scrape_job():
    prom = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "fleetkeeper")
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    assert keep["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name",
                                     "__meta_kubernetes_pod_container_port_name"]
    name, port = keep["regex"].split(";")
    pods = dict(_pods(render(ALL_OPTIONS)))
    assert len(pods) >= 8
    for pod_name, tpl in pods.items():
        assert tpl["metadata"]["labels"]["app.kubernetes.io/name"] == name, pod_name
        if pod_name == "fleetkeeper-promguard":
            continue  # scraped through its own job (deploy/monitoring/prometheus.yml, job promguard)
        ports = [p["name"] for c in tpl["spec"]["containers"] for p in c.get("ports", [])]
        assert port in ports, f"{pod_name} has no port named {port!r}"


def test_agents_take_their_nodes_and_settings_from_values():
    docs = render()
    agent = by_kind(docs, "DaemonSet")["fleetkeeper-health-agent"]["spec"]["template"]["spec"]
    args = agent["containers"][0]["args"]
    assert "--cloud=none" in args and "--expected-gpus=0" in args
    assert "nodeSelector" not in agent  # every node unless the values say otherwise
    assert "fleetkeeper.io/pool" not in yaml.safe_dump(docs)  # a label only the simulator sets
    docs = render({"health": {"agent": {"nodeSelector": {"nvidia.com/gpu.present": "true"}, "cloud": "azure",
                                        "expectedGpus": 8}}})
    agent = by_kind(docs, "DaemonSet")["fleetkeeper-health-agent"]["spec"]["template"]["spec"]
    assert agent["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"--cloud=azure", "--expected-gpus=8", "--metrics-bind-address=:9810"} <= set(agent["containers"][0]["args"])


def test_a_mixed_fleet_takes_the_agent_configuration_from_a_config_map():
    from fleetkeeper.health.agentconfig import load_agent_config

    cfg = {"cloud": "auto", "instance_types": {"p5.48xlarge": {"gpus": 8}, "a3-highgpu-8g": {"gpus": 8}},
           "thresholds": {"disk_full_percent": 90}, "actions": {"enabled": True}}
    docs = render({"health": {"agent": {"config": cfg}}})
    agent = by_kind(docs, "DaemonSet")["fleetkeeper-health-agent"]["spec"]["template"]["spec"]
    args = agent["containers"][0]["args"]
    assert "--config=/etc/fleetkeeper/agent/agent.yaml" in args
    assert not any(a.startswith(("--cloud=", "--expected-gpus=")) for a in args)  # they would override the file
    mounts = {m["name"]: m["mountPath"] for m in agent["containers"][0]["volumeMounts"]}
    assert mounts["config"] == "/etc/fleetkeeper/agent" and mounts["state"] == "/var/lib/fleetkeeper"
    vols = {v["name"]: v for v in agent["volumes"]}
    assert vols["config"]["configMap"]["name"] == "fleetkeeper-health-agent"
    loaded = load_agent_config(by_kind(docs, "ConfigMap")["fleetkeeper-health-agent"]["data"]["agent.yaml"], "chart")
    assert loaded.instance_types["p5.48xlarge"].gpus == 8 and loaded.thresholds.disk_full_percent == 90
    # without a configuration: no ConfigMap, the flags apply to every node; the action state is writable anyway
    docs = render()
    assert "fleetkeeper-health-agent" not in by_kind(docs, "ConfigMap")
    agent = by_kind(docs, "DaemonSet")["fleetkeeper-health-agent"]["spec"]["template"]["spec"]
    assert {m["name"] for m in agent["containers"][0]["volumeMounts"]} >= {"state"}


def test_each_manager_is_highly_available_with_its_own_lease():
    docs = render(ALL_OPTIONS)
    deployments = by_kind(docs, "Deployment")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    leases = set()
    for name in ("fleetkeeper-preflight", "fleetkeeper-health", "fleetkeeper-teams", "fleetkeeper-capacity"):
        d = deployments[name]
        spec = d["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        assert d["spec"]["replicas"] == 2 and d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert "--metrics-bind-address=:8080" in args
        leases |= {a for a in args if a.startswith("--leader-election-id=")}
        assert spec["serviceAccountName"] == name
        assert spec["affinity"]["podAntiAffinity"]
        assert pdbs[name]["spec"]["minAvailable"] == 1
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
        probes = spec["containers"][0]
        assert probes["readinessProbe"]["httpGet"]["port"] == "metrics"
        # a stopping replica keeps answering webhook calls while it leaves the endpoints
        assert probes["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert len(leases) == 4


def _rules(docs):
    for kind in ("ClusterRole", "Role"):
        for name, role in by_kind(docs, kind).items():
            for rule in role["rules"]:
                yield kind, name, rule


def test_least_privilege():
    docs = render(ALL_OPTIONS)
    for kind, name, rule in _rules(docs):
        res, verbs, groups = set(rule["resources"]), set(rule["verbs"]), set(rule["apiGroups"])
        assert "*" not in res | verbs | groups, (name, rule)
        assert not (groups & {"admissionregistration.k8s.io"}), f"{name} may change webhook configurations"
        if "secrets" in res:
            assert kind == "Role" and rule.get("resourceNames") and verbs <= {"get"}, (name, rule)
        if "pods" in res and verbs & {"patch", "update"} and name != "fleetkeeper-capacity":
            pytest.fail(f"{kind} {name} may patch pods: {rule}")
        if "pods" in res and name == "fleetkeeper-capacity":
            # patch: the release annotation on balloons, the reservation toleration on a starving gang's
            # pods; create/delete: the requeue pod of a gang kube-scheduler stopped trying; never update
            assert "update" not in verbs and verbs <= {"list", "watch", "patch", "create", "delete"}, rule
        if {"roles", "clusterroles", "rolebindings", "clusterrolebindings"} & res:
            pytest.fail(f"{name} may change RBAC")
    # the coscheduling backend is the one thing that labels pods, and only when chosen
    cosched = render({"capacity": {"enabled": True, "config": {"gangs": {"backend": "coscheduling"}}}})
    assert any("pods" in r["resources"] and "patch" in r["verbs"] for _, n, r in _rules(cosched)
               if n == "fleetkeeper-capacity")


def test_one_service_account_per_component_and_tokens_only_where_needed():
    sas = by_kind(render(ALL_OPTIONS), "ServiceAccount")
    assert set(sas) == {f"fleetkeeper-{c}" for c in ("preflight", "preflight-runner", "health", "health-agent",
                                                         "teams", "capacity", "relay", "netacct", "promguard")}
    assert sas["fleetkeeper-preflight-runner"]["automountServiceAccountToken"] is False
    assert sas["fleetkeeper-promguard"]["automountServiceAccountToken"] is False


def _strip(obj: dict) -> dict:
    """A webhook configuration without what only the chart or only the code sets."""
    obj = yaml.safe_load(yaml.safe_dump(obj))
    meta = obj["metadata"]
    obj["metadata"] = {"name": meta["name"]}
    for w in obj["webhooks"]:
        w["clientConfig"].pop("caBundle", None)
    return obj


def test_webhook_configurations_match_what_the_components_register():
    docs = render({"capacity": {"enabled": True}})
    ca = base64.b64decode(by_kind(docs, "Secret")["fleetkeeper-webhook-tls"]["data"]["ca.crt"])
    mutating = by_kind(docs, "MutatingWebhookConfiguration")
    validating = by_kind(docs, "ValidatingWebhookConfiguration")
    teams_opts = WebhookOptions.model_validate({"service": f"{NAMESPACE}/fleetkeeper-teams-webhook:443"})
    m, v = registrations(teams_opts, NAMESPACE, 9443, ca, "fleetkeeper.io")
    assert _strip(mutating["fleetkeeper-teams"]) == _strip(m)
    assert _strip(validating["fleetkeeper-teams"]) == _strip(v)
    gate = gate_registration(WebhookConfig(port=9443), ca, namespace=NAMESPACE)
    assert _strip(mutating["fleetkeeper-preflight-gate"]) == _strip(gate)
    gang = webhook_registration(CapacityConfig(), Names("fleetkeeper.io"), "fleetkeeper-capacity", None, ca,
                                None, NAMESPACE)
    assert _strip(mutating["fleetkeeper-capacity"]) == _strip(gang)
    for obj in (*mutating.values(), *validating.values()):
        for w in obj["webhooks"]:
            assert base64.b64decode(w["clientConfig"]["caBundle"]) == ca


def test_each_webhook_service_reaches_its_process_one_webhook_server():
    """Every Deployment with a webhook runs one webhook server (--webhook-bind-address) on the container
    port its Service targets, serving the mounted shared certificate (--webhook-cert-dir)."""
    docs = render({"capacity": {"enabled": True}})
    deployments = by_kind(docs, "Deployment")
    services = {n: s for n, s in by_kind(docs, "Service").items() if n.endswith("-webhook")}
    assert services
    for name, svc in services.items():
        d = deployments[name.removesuffix("-webhook")]
        assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"], name
        c = d["spec"]["template"]["spec"]["containers"][0]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "webhook")
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["webhook"], name
        assert f"--webhook-bind-address=:{port}" in c["args"], name
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "webhook-tls")
        assert f"--webhook-cert-dir={mount}" in c["args"], name
    for name, d in deployments.items():
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        if f"{name}-webhook" not in services:
            assert not any(a.startswith("--webhook-") for a in args), name


def test_one_certificate_for_every_webhook_service():
    from cryptography import x509

    docs = render({"capacity": {"enabled": True}})
    secret = by_kind(docs, "Secret")["fleetkeeper-webhook-tls"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    sans = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
               .get_values_for_type(x509.DNSName))
    services = {n for n, s in by_kind(docs, "Service").items() if n.endswith("-webhook")}
    assert services == {"fleetkeeper-preflight-webhook", "fleetkeeper-teams-webhook", "fleetkeeper-capacity-webhook"}
    assert {f"{s}.{NAMESPACE}.svc" for s in services} <= sans
    mounts = {n for n, d in by_kind(docs, "Deployment").items()
              if any(v.get("secret", {}).get("secretName") == "fleetkeeper-webhook-tls"
                     for v in d["spec"]["template"]["spec"]["volumes"])}
    assert mounts == {"fleetkeeper-preflight", "fleetkeeper-teams", "fleetkeeper-capacity"}


def test_cert_manager_when_its_api_is_served():
    docs = render(api_versions=("cert-manager.io/v1",))
    assert "fleetkeeper-webhook-tls" in by_kind(docs, "Certificate")
    assert "fleetkeeper-webhook-tls" not in by_kind(docs, "Secret")
    for w in by_kind(docs, "MutatingWebhookConfiguration").values():
        assert w["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/fleetkeeper-webhook-tls"
        assert all("caBundle" not in x["clientConfig"] for x in w["webhooks"])


def test_component_configuration_is_valid_for_the_components():
    """The ConfigMaps the chart writes load into the components' own models."""
    from fleetkeeper.capacity.config import load_config_text
    from fleetkeeper.health.policy import load_policy
    from fleetkeeper.preflight.config import parse_config
    from fleetkeeper.teams.config import parse_config as parse_teams
    from fleetkeeper.teams.options import TeamsOptions

    cms = by_kind(render(ALL_OPTIONS), "ConfigMap")
    pf = parse_config(cms["fleetkeeper-preflight"]["data"]["config.yaml"], "chart")
    assert pf.webhook.cert_dir == "/etc/fleetkeeper/webhook-tls" and not pf.webhook.auto_register
    assert pf.image == "localhost/fleetkeeper-validator:0.1.0"
    load_policy(cms["fleetkeeper-health"]["data"]["policy.yaml"], "chart")
    parse_teams(cms["fleetkeeper-teams"]["data"]["config.yaml"], "chart", "fleetkeeper.io")
    opts = TeamsOptions.model_validate(yaml.safe_load(cms["fleetkeeper-teams"]["data"]["options.yaml"]))
    assert not opts.webhook.register_webhook and not opts.webhook.unregisters_on_exit
    cap = load_config_text(cms["fleetkeeper-capacity"]["data"]["config.yaml"], "chart")
    assert cap.gangs.webhook_cert_dir and not cap.gangs.manage_webhook_registration


def test_relay_serves_the_service_port_and_checks_its_open_file_limit():
    from typer.testing import CliRunner

    from fleetkeeper.relay.cli import app
    from fleetkeeper.relay.settings import parse_config

    docs = render({"relay": {"enabled": True, "expectedAgents": 2500,
                             "config": {"relay": {"max_inflight": 64}}}, "logLevel": "debug"})
    relay = by_kind(docs, "Deployment")["fleetkeeper-relay"]["spec"]["template"]["spec"]
    container = relay["containers"][0]
    args = container["args"]
    # its settings are the ConfigMap's relay: section, mounted where --config points
    path = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in relay["volumes"] if v["name"] == mount["name"])
    cm = by_kind(docs, "ConfigMap")[volume["configMap"]["name"]]
    rs = parse_config(cm["data"][path.rsplit("/", 1)[1]], "chart").relay
    service = by_kind(docs, "Service")["fleetkeeper-relay"]
    assert rs.host == "0.0.0.0" and rs.port == service["spec"]["ports"][0]["targetPort"]  # not the pod's loopback
    assert {"name": "relay", "containerPort": rs.port} in container["ports"]
    assert rs.expected_agents == 2500 and rs.max_inflight == 64  # the chart's and the user's settings both apply
    assert "--log-level=debug" in args  # the chart's logLevel reaches the relay too
    # every flag the chart passes is one `relay serve` has
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    out = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    missing = [f for f in flags if f not in out]
    assert not missing, missing
