"""Rendering the Helm chart (charts/fleetkeeper) with the Helm built by
hack/build-helm.sh, for the chart tests and the end-to-end tests that apply it."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fleetkeeper"
NAMESPACE = "fleetkeeper-system"

# Every option on: what the lint and the server-side schema check cover.
ALL_OPTIONS = {"capacity": {"enabled": True}, "relay": {"enabled": True}, "promguard": {"enabled": True},
               "netacct": {"agent": {"enabled": True}}}


def helm_binary() -> str:
    """The cached Helm (make helm); the tests that need it are skipped without it."""
    env = os.environ.get("FLEETKEEPER_HELM")
    if env:
        return env
    r = subprocess.run(["bash", str(ROOT / "hack" / "build-helm.sh")], capture_output=True, text=True,
                       env={**os.environ, "FLEETKEEPER_HELM_NO_BUILD": "1"})
    path = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
    if not path or not Path(path).exists():
        pytest.skip("helm not built (make helm)")
    return path


def helm(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run helm; ``timeout`` must exceed any ``--timeout`` passed to helm, so that helm's own
    error (what it waited for) is what a failure shows."""
    r = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def values_args(values: dict | None) -> list[str]:
    if not values:
        return []
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    with f:
        json.dump(values, f)
    return ["-f", f.name]


def render(values: dict | None = None, *, namespace: str = NAMESPACE, release: str = "fleetkeeper",
           api_versions: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", release, str(CHART), "--namespace", namespace, *values_args(values)]
    for v in api_versions:
        args += ["--api-versions", v]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
