"""Bad input gets a clear error naming what is wrong."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetkeeper.cli.main import _register_subapps, app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
_register_subapps()


def test_unknown_controller_is_named():
    r = runner.invoke(app, ["run", "--controllers", "nosuch"])
    assert r.exit_code == 2
    assert "nosuch" in r.output


def test_bad_domain_flag_is_a_config_error():
    r = runner.invoke(app, ["run", "--controllers", "", "--domain", "Not A Domain"])
    assert r.exit_code == 2
    assert "domain" in r.output and "DNS subdomain" in r.output


def test_bad_machine_provider_flag_is_named_before_anything_starts():
    r = runner.invoke(app, ["run", "--controllers", "health", "--machine-provider", "openstack"])
    assert r.exit_code == 2
    assert "--machine-provider" in r.output and "openstack" in r.output and "cluster-api" in r.output


def test_unreachable_api_server(tmp_path):
    kc = tmp_path / "kubeconfig"
    kc.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n"
        "    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: x\ncontexts:\n- name: c\n"
        "  context:\n    cluster: c\n    user: u\ncurrent-context: c\n")
    r = runner.invoke(app, ["explain", "node", "n1", "--kubeconfig", str(kc)])
    assert r.exit_code == 1
    assert "cannot reach the Kubernetes API server" in r.output and "127.0.0.1:1" in r.output


def test_missing_kubeconfig_file(tmp_path):
    r = runner.invoke(app, ["explain", "node", "n1", "--kubeconfig", str(tmp_path / "nope")])
    assert r.exit_code == 2
    assert "kubeconfig" in r.output


def test_cluster_up_on_occupied_port_fails_clearly(tmp_path, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        bindir = tmp_path / "bin"
        (bindir / "kwok-stages").mkdir(parents=True)
        for b in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok"):
            (bindir / b).write_text("#!/bin/sh\nexit 1\n")
            (bindir / b).chmod(0o755)
        monkeypatch.setenv("FLEETKEEPER_BIN_DIR", str(bindir))
        r = runner.invoke(app, ["cluster", "up", "--nodes", "1", "--port", str(port), "--dir", str(tmp_path / "c")])
        assert r.exit_code == 1
        assert f"port {port}" in r.output and "already in use" in r.output
        assert not (tmp_path / "c" / "logs").exists()  # nothing was started
    finally:
        s.close()


def test_cluster_status_without_cluster(tmp_path):
    r = runner.invoke(app, ["cluster", "status", "--dir", str(tmp_path / "none")])
    assert r.exit_code == 1 and "no local cluster" in r.output


def _build(env_extra: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLEETKEEPER_CACHE=str(tmp_path / "cache"), **env_extra)
    env.pop("FLEETKEEPER_RELEASE_URL", None)
    return subprocess.run(["bash", str(ROOT / "hack/build-controlplane.sh")], env=env, capture_output=True, text=True,
                          timeout=60)


def test_build_without_go_says_what_to_do(tmp_path):
    r = _build({"PATH": "/usr/bin:/bin"} if not Path("/usr/bin/go").exists() else {"PATH": str(tmp_path)}, tmp_path)
    assert r.returncode != 0
    assert "no 'go' on PATH" in r.stderr


def test_build_without_module_proxy_says_what_to_do(tmp_path):
    r = _build({"GOPROXY": "off"}, tmp_path)
    assert r.returncode != 0 and "GOPROXY is 'off'" in r.stderr
    r = _build({"GOPROXY": "http://127.0.0.1:9"}, tmp_path)
    assert r.returncode != 0 and "cannot reach the Go module proxy" in r.stderr


def test_local_cluster_ports_stay_below_the_ephemeral_range(tmp_path):
    # a port in the ephemeral range can be taken by an outgoing connection (or a client's self-connect)
    # while a component restarts; the cluster's ports are picked below it
    from fleetkeeper.localcluster.cluster import ephemeral_range, free_port, port_free

    lo, hi = ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(p < lo and port_free(p) for p in ports), (lo, sorted(ports))
    assert len(ports) > 1  # chosen at random, not one fixed port
    f = tmp_path / "range"
    f.write_text("40000\t60999\n")
    assert ephemeral_range(f) == (40000, 60999)
    f.write_text("garbage")
    assert ephemeral_range(f) == (32768, 60999)


def test_preflight_status_bad_config_is_named_before_the_cluster_is_read(tmp_path):
    cfg = tmp_path / "preflight.yaml"
    cfg.write_text("gate:\n  start_when_ready: maybe\n")
    kc = tmp_path / "kubeconfig"  # unreachable: a config error must come first
    kc.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n"
        "    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: x\ncontexts:\n- name: c\n"
        "  context:\n    cluster: c\n    user: u\ncurrent-context: c\n")
    r = runner.invoke(app, ["preflight", "status", "--config", str(cfg), "--kubeconfig", str(kc)])
    assert r.exit_code == 2, r.output
    assert str(cfg) in r.output and "start_when_ready" in r.output
    assert "cannot reach" not in r.output
