"""The monitoring pack, checked by real promtool / Prometheus / VictoriaMetrics."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from fleetkeeper.promguard.testbed import PrometheusProcess, SyntheticTarget, find_binary, free_port

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = sorted((ROOT / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((ROOT / "tests").glob("*.test.yml"))
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))

PROMTOOL = find_binary("promtool")
PROMETHEUS = find_binary("prometheus")
VM = find_binary("victoria-metrics")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package 'prometheus', see hack/apt-packages.txt)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="needs prometheus (Debian package 'prometheus')")
needs_vm = pytest.mark.skipif(VM is None, reason="needs victoria-metrics (Debian package 'victoria-metrics')")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def all_rules() -> list[dict]:
    out = []
    for f in RULES:
        for g in yaml.safe_load(f.read_text())["groups"]:
            out += g["rules"]
    return out


# ------------------------------------------------------------------ rules


def test_rule_files_present():
    names = {f.name for f in RULES}
    assert {"apiserver.rules.yml", "fleetkeeper.rules.yml"} <= names
    assert len(RULE_TESTS) >= 2


@pytest.mark.promtool
@needs_promtool
@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_promtool_check_rules(path):
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.promtool
@needs_promtool
@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(path):
    r = promtool("test", "rules", path.name, cwd=path.parent)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.promtool
@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path):
    """A wrong expectation must make promtool fail (guards against tests that test nothing)."""
    src = (ROOT / "tests" / "apiserver.test.yml").read_text()
    broken = src.replace("exp_labels: {severity: critical, component: etcd, instance: etcd-1}",
                         "exp_labels: {severity: critical, component: etcd, instance: etcd-0}")
    assert broken != src
    (tmp_path / "rules").mkdir()
    for f in RULES:
        shutil.copy(f, tmp_path / "rules" / f.name)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "broken.test.yml").write_text(broken)
    r = promtool("test", "rules", "broken.test.yml", cwd=tmp_path / "tests")
    assert r.returncode != 0
    assert "EtcdNoLeader" in r.stdout + r.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    tested: set[str] = set()
    for f in RULE_TESTS:
        for t in yaml.safe_load(f.read_text())["tests"]:
            for a in t.get("alert_rule_test") or []:
                if a.get("exp_alerts"):
                    tested.add(a["alertname"])
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    assert alerts - tested == set(), "alerts with no firing unit test"


def test_alerts_are_well_formed():
    for r in all_rules():
        if "alert" not in r:
            assert ":" in r["record"], f"recording rule {r['record']} should be level:metric:operations"
            continue
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        for key in ("summary", "description", "runbook"):
            assert r["annotations"].get(key), f"{r['alert']} lacks {key}"
        anchor = r["annotations"]["runbook"].split("#")[1]
        readme = (ROOT / "README.md").read_text().lower()
        assert f"### {anchor}" in readme.replace("`", ""), f"README has no runbook section for {anchor}"


# ------------------------------------------------------------------ scrape config


def _checkable_config(tmp: Path) -> Path:
    """Copy prometheus.yml for promtool.

    Debian builds Prometheus without Kubernetes service discovery, so its promtool
    rejects ``kubernetes_sd_configs``; each is swapped for an equivalent file_sd so
    everything else (relabelling, limits, remote_write, rule files) is still checked.
    Credential files are pointed at empty stand-ins.
    """
    cfg = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    (tmp / "targets.json").write_text("[]")
    (tmp / "token").write_text("x")
    shutil.copytree(ROOT / "rules", tmp / "rules")
    for job in cfg["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            job.pop("kubernetes_sd_configs")
            job["file_sd_configs"] = [{"files": [str(tmp / "targets.json")]}]
        if "bearer_token_file" in job:
            job["bearer_token_file"] = str(tmp / "token")
        if "ca_file" in (job.get("tls_config") or {}):
            job["tls_config"]["ca_file"] = str(tmp / "token")
    out = tmp / "prometheus.yml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


@pytest.mark.promtool
@needs_promtool
def test_promtool_check_config(tmp_path):
    r = promtool("check", "config", str(_checkable_config(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_scrape_config_limits_and_drops():
    cfg = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    per_node = ("node-exporter", "kubelet-cadvisor", "dcgm-exporter")
    for name, job in jobs.items():
        assert job.get("sample_limit"), f"{name} has no sample_limit"
    for name in per_node:
        assert jobs[name].get("target_limit", 0) >= 7500, f"{name} must allow one target per node"
        assert jobs[name]["metric_relabel_configs"], name
    readme = (ROOT / "README.md").read_text()
    for name, job in jobs.items():
        for rule in job.get("metric_relabel_configs") or []:
            if rule.get("action") in ("drop", "labeldrop"):
                assert f"`{name}`" in readme, f"README does not explain the drops of {name}"
    assert cfg["remote_write"][0]["queue_config"]["max_shards"] > 0


NODE_EXPOSITION = "\n".join(
    [f'node_cpu_seconds_total{{cpu="{c}",mode="{m}"}} 1' for c in range(4)
     for m in ("idle", "iowait", "user", "system", "guest", "nice", "irq", "softirq", "steal")]
    + [f'node_network_receive_bytes_total{{device="{d}"}} 1' for d in ("eth0", "ib0", "veth12ab", "cali9", "lo")]
    + [f'node_filesystem_avail_bytes{{fstype="{t}",mountpoint="/{t}"}} 1' for t in ("ext4", "xfs", "tmpfs", "overlay")]
    + ['node_softnet_processed_total{cpu="0"} 1', "node_load1 1"]
) + "\n"


@pytest.mark.promtool
@needs_prometheus
async def test_node_exporter_drops_in_a_real_prometheus():
    """Scrape a node-exporter-shaped page through the shipped metric_relabel_configs."""
    cfg = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    job = copy.deepcopy(next(j for j in cfg["scrape_configs"] if j["job_name"] == "node-exporter"))
    target = SyntheticTarget(NODE_EXPOSITION.encode(), full_scrapes=10_000)
    port = await target.start()
    job.pop("kubernetes_sd_configs")
    job.pop("relabel_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    prom = PrometheusProcess(yaml.safe_dump({"scrape_configs": [job]}), binary=PROMETHEUS)
    try:
        await prom.start()
        await prom.wait_for('scrape_samples_post_metric_relabeling{job="node-exporter"}', 1, timeout=30)
        kept = await prom.query_scalar('scrape_samples_post_metric_relabeling{job="node-exporter"}')
        scraped = await prom.query_scalar('scrape_samples_scraped{job="node-exporter"}')
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{prom.url}/api/v1/series", params={"match[]": '{job="node-exporter"}'}) as r:
                series = orjson.loads(await r.read())["data"]
    finally:
        await prom.stop()
        await target.stop()
    assert scraped == 4 * 9 + 5 + 4 + 2
    assert kept == 4 * 4 + 2 + 2 + 1  # 4 modes kept; eth0+ib0; ext4+xfs; node_load1
    modes = {s["mode"] for s in series if s["__name__"] == "node_cpu_seconds_total"}
    assert modes == {"idle", "iowait", "user", "system"}
    devices = {s["device"] for s in series if s["__name__"].startswith("node_network_")}
    assert devices == {"eth0", "ib0"}


# ------------------------------------------------------------------ dashboards


def _exprs(d: dict) -> list[str]:
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def test_dashboards_structure():
    want = {"fleet-nodes", "team-allocation", "health-actions", "apiserver-load", "network-by-team", "fleet-map"}
    assert {p.stem for p in DASHBOARDS} == want
    uids = set()
    recorded = {r["record"] for r in all_rules() if "record" in r}
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["title"] and d["uid"] not in uids
        uids.add(d["uid"])
        assert any(v["type"] == "datasource" for v in d["templating"]["list"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and ids
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
            assert p["targets"], p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))
        for e in _exprs(d):
            for name in re.findall(r"[a-zA-Z_]+:[a-zA-Z0-9_:]+", e):
                assert name in recorded, f"{path.name}: {name} is not a recording rule"


@pytest.mark.promtool
@needs_prometheus
async def test_dashboard_and_rule_queries_parse_in_prometheus():
    prom = PrometheusProcess("global: {scrape_interval: 1h}\n", binary=PROMETHEUS)
    exprs = [e for p in DASHBOARDS for e in _exprs(json.loads(p.read_text()))]
    exprs += [r["expr"] for r in all_rules()]
    try:
        await prom.start()
        async with aiohttp.ClientSession() as s:
            for e in exprs:
                async with s.post(f"{prom.url}/api/v1/query", data={"query": e}) as r:
                    body = orjson.loads(await r.read())
                assert body["status"] == "success", (e, body)
            async with s.post(f"{prom.url}/api/v1/query", data={"query": "sum(rate(x[5m]"}) as r:
                assert r.status == 400  # the check above can fail
    finally:
        await prom.stop()


# ------------------------------------------------------------------ long-term store (R19)


@pytest.mark.promtool
@needs_prometheus
@needs_vm
async def test_remote_write_reaches_victoria_metrics():
    """The shipped remote_write block, pointed at a real VictoriaMetrics on loopback."""
    cfg = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    rw = copy.deepcopy(cfg["remote_write"][0])
    vm_port = free_port()
    vm_dir = Path(tempfile.mkdtemp(prefix="fk-vm-"))
    rw["url"] = f"http://127.0.0.1:{vm_port}/api/v1/write"
    rw["queue_config"]["batch_send_deadline"] = "1s"
    body = "".join(
        [f'DCGM_FI_DEV_GPU_UTIL{{gpu="{g}",node="n1"}} {50 + g}\n' for g in range(8)]
        + [f'DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{gpu="{g}",node="n1"}} 0.5\n' for g in range(8)]
    ).encode()
    target = SyntheticTarget(body, full_scrapes=10_000)
    tport = await target.start()
    prom_cfg = {
        "global": {"scrape_interval": "1s", "external_labels": {"cluster": "test"}},
        "remote_write": [rw],
        "scrape_configs": [{"job_name": "dcgm", "static_configs": [{"targets": [f"127.0.0.1:{tport}"]}]}],
    }
    vm = subprocess.Popen([VM, f"-storageDataPath={vm_dir}", f"-httpListenAddr=127.0.0.1:{vm_port}",
                           "-search.latencyOffset=0s", "-retentionPeriod=1d"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    prom = PrometheusProcess(yaml.safe_dump(prom_cfg), binary=PROMETHEUS)
    try:
        await prom.start()
        got: list = []
        async with aiohttp.ClientSession() as s:
            for _ in range(120):
                try:
                    async with s.get(f"http://127.0.0.1:{vm_port}/api/v1/query",
                                     params={"query": 'DCGM_FI_DEV_GPU_UTIL{cluster="test"}'}) as r:
                        got = orjson.loads(await r.read())["data"]["result"]
                except aiohttp.ClientError:
                    got = []
                if len(got) == 8:
                    break
                await asyncio.sleep(0.25)
            async with s.get(f"http://127.0.0.1:{vm_port}/api/v1/series",
                             params={"match[]": '{__name__=~"DCGM_.*"}'}) as r:
                names = {x["__name__"] for x in orjson.loads(await r.read())["data"]}
    finally:
        await prom.stop()
        vm.terminate()
        await asyncio.to_thread(vm.wait, 10)
        await target.stop()
        shutil.rmtree(vm_dir, ignore_errors=True)
    assert len(got) == 8, got
    assert {float(x["value"][1]) for x in got} == {50.0 + g for g in range(8)}
    assert names == {"DCGM_FI_DEV_GPU_UTIL"}  # write_relabel_configs kept profiling metrics local
