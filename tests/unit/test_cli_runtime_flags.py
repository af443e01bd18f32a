"""The command line as a platform team uses it: --context and -o everywhere, one
kubeconfig resolution order, `run` defaults that start, --metrics-bind-address,
the version from an installed wheel, SIGTERM as PID 1 and the agent's /metrics."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from fleetkeeper.cli import main as cli_main
from fleetkeeper.core import cliutil, errors

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
cli_main._register_subapps()
app = cli_main.app


def _commands(cmd, path=()):
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, cmd


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in getattr(p, "opts", [])}


def test_every_command_with_kubeconfig_takes_context():
    seen = 0
    for path, cmd in _commands(get_command(app)):
        opts = _options(cmd)
        if "--kubeconfig" in opts:
            seen += 1
            assert "--context" in opts, f"fleetkeeper {' '.join(path)} has --kubeconfig but no --context"
    assert seen >= 15


def test_every_status_and_explain_command_has_structured_output():
    wanted = [p for p, _ in _commands(get_command(app)) if p[-1] in ("status", "explain") or p[0] == "explain"]
    assert len(wanted) >= 7, wanted
    for path, cmd in _commands(get_command(app)):
        if path in wanted:
            assert {"-o", "--output"} <= _options(cmd), f"fleetkeeper {' '.join(path)} lacks -o json|yaml"


def test_output_rejects_an_unknown_format():
    r = runner.invoke(app, ["version", "-o", "xml"])
    assert r.exit_code == 2 and "xml" in r.output


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_structured_output_parses(fmt):
    r = runner.invoke(app, ["version", "-o", fmt])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output) if fmt == "json" else yaml.safe_load(r.output)
    assert data["fleetkeeper"] == cli_main.__version__


def test_promguard_explain_speaks_yaml():
    r = runner.invoke(app, ["promguard", "explain", "/api/v1/query?query=up", "-o", "yaml"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output)["action"] in ("forward", "passthrough")


# --- which cluster --------------------------------------------------------------
@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FLEETKEEPER_CLUSTER_DIR", str(tmp_path / "cluster"))
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_kubeconfig_resolution_order(clean_env, monkeypatch, capsys):
    local = clean_env / "cluster" / "kubeconfig"
    local.parent.mkdir()
    local.write_text("local")
    # 4. nothing else configured: the local cluster, and it says so
    assert cliutil.resolve_kubeconfig(None) == str(local)
    assert "local cluster" in capsys.readouterr().err
    # 3. ~/.kube/config exists: the client's default chain, never the local cluster
    kube_dir = Path(os.environ["HOME"]) / ".kube"
    kube_dir.mkdir()
    (kube_dir / "config").write_text("home")
    assert cliutil.resolve_kubeconfig(None) is None
    # 2. in a pod: in-cluster
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    (kube_dir / "config").unlink()
    assert cliutil.resolve_kubeconfig(None) is None
    # 1. $KUBECONFIG and the flag win over everything
    monkeypatch.setenv("KUBECONFIG", "/from/env")
    assert cliutil.resolve_kubeconfig(None) == "/from/env"
    assert cliutil.resolve_kubeconfig("/from/flag") == "/from/flag"


async def test_no_cluster_configured_is_named(clean_env):
    with pytest.raises(errors.ConfigError, match="no cluster configured"):
        await cliutil.connect(None)


def test_context_picks_the_kubeconfig_context(tmp_path):
    kc = tmp_path / "kubeconfig"
    kc.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- {name: a, cluster: {server: 'https://127.0.0.1:1'}}\n"
        "- {name: b, cluster: {server: 'https://127.0.0.1:2'}}\nusers:\n- {name: u, user: {token: x}}\n"
        "contexts:\n- {name: a, context: {cluster: a, user: u}}\n- {name: b, context: {cluster: b, user: u}}\n"
        "current-context: a\n")
    r = runner.invoke(app, ["explain", "node", "n1", "--kubeconfig", str(kc), "--context", "b"])
    assert r.exit_code == 1 and "127.0.0.1:2" in r.output, r.output
    r = runner.invoke(app, ["teams", "status", "--kubeconfig", str(kc), "--context", "b"])
    assert r.exit_code == 1 and "127.0.0.1:2" in r.output, r.output
    r = runner.invoke(app, ["explain", "node", "n1", "--kubeconfig", str(kc), "--context", "nosuch"])
    assert r.exit_code == 2 and "nosuch" in r.output, r.output
    cliutil.select_context(None)


# --- run ---------------------------------------------------------------------------
@pytest.fixture
def captured_run(monkeypatch):
    seen = {}

    async def fake(settings, **kw):
        seen["settings"] = settings

    monkeypatch.setattr(cli_main, "run_manager", fake)
    return seen


def test_run_defaults_to_the_components_that_have_controllers(captured_run):
    r = runner.invoke(app, ["run", "--dry-run"])
    assert r.exit_code == 0, r.output
    names = captured_run["settings"].controllers
    assert names and "netacct" not in names and "promguard" not in names
    for name in names:  # each can be set up: what `run` imports
        assert callable(importlib.import_module(f"{cli_main.COMPONENTS[name]}.controller").setup)


def test_run_refuses_a_component_without_a_controller(captured_run):
    r = runner.invoke(app, ["run", "--controllers", "netacct"])
    assert r.exit_code == 2 and "netacct" in r.output and "settings" not in captured_run


@pytest.mark.parametrize("flag,host,port", [(":8080", "0.0.0.0", 8080), ("127.0.0.1:9090", "127.0.0.1", 9090),
                                            ("[::]:8443", "::", 8443)])
def test_metrics_bind_address(captured_run, flag, host, port):
    r = runner.invoke(app, ["run", "--controllers", "", f"--metrics-bind-address={flag}",
                            "--leader-election-id", "fk-x"])
    assert r.exit_code == 0, r.output
    s = captured_run["settings"]
    assert (s.server.host, s.server.port, s.leader_election.lease_name) == (host, port, "fk-x")


def test_metrics_bind_address_default_stays_on_loopback(captured_run):
    assert runner.invoke(app, ["run", "--controllers", ""]).exit_code == 0
    assert captured_run["settings"].server.host == "127.0.0.1"


def test_bad_metrics_bind_address_is_named(captured_run):
    r = runner.invoke(app, ["run", "--controllers", "", "--metrics-bind-address", "8080"])
    assert r.exit_code == 2 and "--metrics-bind-address" in r.output


def test_webhook_bind_address_and_cert_dir(captured_run, tmp_path):
    r = runner.invoke(app, ["run", "--controllers", "", "--webhook-bind-address", ":9443",
                            "--webhook-cert-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    w = captured_run["settings"].webhook
    assert (w.host, w.port, w.cert_dir) == ("0.0.0.0", 9443, str(tmp_path))
    assert runner.invoke(app, ["run", "--controllers", ""]).exit_code == 0
    assert captured_run["settings"].webhook.port is None  # the components' own settings
    r = runner.invoke(app, ["run", "--controllers", "", "--webhook-bind-address", "9443"])
    assert r.exit_code == 2 and "--webhook-bind-address" in r.output


# --- an installed wheel -----------------------------------------------------------------
def test_version_from_an_installed_wheel(tmp_path):
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.skip("uv not installed")
    subprocess.run([uv, "build", "-q", "--wheel", "-o", str(tmp_path / "dist"), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("fleetkeeper-*.whl"))
    subprocess.run([uv, "pip", "install", "-q", "--python", sys.executable, "--no-deps", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import fleetkeeper, sys; from fleetkeeper.cli.main import main; "
            "assert fleetkeeper.__file__.startswith(sys.argv[1]), fleetkeeper.__file__; "
            "sys.argv = ['fleetkeeper', 'version', '-o', 'json']; main()")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert json.loads(r.stdout)["fleetkeeper"] == declared


# --- SIGTERM as PID 1, and the health agent's /metrics ------------------------------------
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_agent_as_pid1_serves_metrics_and_stops_on_sigterm(tmp_path):
    kc = tmp_path / "kubeconfig"  # never contacted: --dry-run writes nothing
    kc.write_text("apiVersion: v1\nkind: Config\nclusters:\n- {name: c, cluster: {server: 'https://127.0.0.1:1'}}\n"
                  "users:\n- {name: u, user: {token: x}}\ncontexts:\n- {name: c, context: {cluster: c, user: u}}\n"
                  "current-context: c\n")
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    exe = Path(sys.executable).parent / "fleetkeeper"
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", str(exe), "health", "agent", "--node", "n1", "--dry-run",
         "--kubeconfig", str(kc), "--root", str(tmp_path), "--kmsg", str(kmsg), "--gpu", "none",
         "--disk-path", "/", "--interval", "1", "--metrics-bind-address", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            m = re.search(r"ops server on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "".join(lines)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the agent never became ready"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "fleetkeeper_health_agent_check_seconds" in body
        # the agent is PID 1 of its namespace: SIGTERM from outside has no default action there
        child = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)], text=True).split()[0])
        nspid = next(ln for ln in Path(f"/proc/{child}/status").read_text().splitlines() if ln.startswith("NSpid:"))
        assert nspid.split()[-1] == "1", nspid
        os.kill(child, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
