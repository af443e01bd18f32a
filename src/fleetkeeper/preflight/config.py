"""Preflight configuration: thresholds per instance type / GPU model, the gate,
the periodic re-tests and the webhook. Loaded from the ConfigMap
``fleetkeeper-preflight`` (key ``config.yaml``) or a file; every problem is
reported with its field path (``core.config.load_model``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetkeeper.core.config import load_model, parse_yaml

CONFIGMAP_NAME = "fleetkeeper-preflight"
CONFIGMAP_KEY = "config.yaml"

CHECKS = ("gpu-count", "gpu-pcie", "gpu-ecc", "gpu-rows", "gpu-thermal", "gpu-matmul", "gpu-hbm", "nccl",
          "dcgm", "cpu", "memory", "disk")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Match(_Strict):
    instance_types: list[str] = Field(default_factory=list, description="node.kubernetes.io/instance-type values")
    gpu_models: list[str] = Field(default_factory=list, description="NVML device names (substring match)")


class Profile(_Strict):
    """Thresholds for one kind of machine."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    match: Match = Match()
    expected_gpus: int = Field(0, ge=0, le=64)
    min_pcie_gen: int = Field(4, ge=1, le=6)
    min_pcie_width: int = Field(16, ge=1, le=32)
    require_ecc: bool = True
    max_ecc_uncorrected: int = Field(0, ge=0)
    max_ecc_corrected: int = Field(10_000, ge=0, description="volatile corrected errors tolerated")
    max_retired_pages: int = Field(0, ge=0)
    allow_pending_remap: bool = False
    max_temp_c: int = Field(85, ge=30, le=120)
    expected_tflops: float = Field(0.0, ge=0, description="dense BF16 matmul TFLOP/s per GPU of the model")
    min_tflops_fraction: float = Field(0.8, gt=0, le=1)
    min_hbm_gbps: float = Field(0.0, ge=0, description="device-to-device copy GB/s per GPU")
    min_nccl_busbw_gbps: float = Field(0.0, ge=0, description="all-reduce bus bandwidth across the node's GPUs")
    dcgm_level: int = Field(1, ge=1, le=4)
    min_cpus: int = Field(1, ge=1)
    min_memory_gib: float = Field(1.0, gt=0)
    min_disk_free_gib: float = Field(1.0, ge=0)
    disk_path: str = "/tmp"
    skip: list[str] = Field(default_factory=list, description="checks not run for this profile")
    required: list[str] = Field(default_factory=list,
                                description="checks that must run: skipping one (e.g. no torch) fails the suite")

    @model_validator(mode="after")
    def _known(self) -> "Profile":
        bad = [c for c in self.skip + self.required if c not in CHECKS]
        if bad:
            raise ValueError(f"unknown check(s) {bad}; known: {list(CHECKS)}")
        return self

    @property
    def min_tflops(self) -> float:
        return round(self.expected_tflops * self.min_tflops_fraction, 1)


def default_profiles() -> list[Profile]:
    return [
        Profile(name="h100-8x", match=Match(instance_types=["gpu-8x-h100", "p5.48xlarge", "Standard_ND96isr_H100_v5"],
                                            gpu_models=["H100"]),
                expected_gpus=8, min_pcie_gen=5, expected_tflops=989.0, min_hbm_gbps=2500.0,
                min_nccl_busbw_gbps=350.0, min_cpus=64, min_memory_gib=1000),
        Profile(name="h200-8x", match=Match(instance_types=["gpu-8x-h200", "p5e.48xlarge"], gpu_models=["H200"]),
                expected_gpus=8, min_pcie_gen=5, expected_tflops=989.0, min_hbm_gbps=3500.0,
                min_nccl_busbw_gbps=350.0, min_cpus=64, min_memory_gib=1000),
        Profile(name="a100-8x", match=Match(instance_types=["gpu-8x-a100", "p4d.24xlarge"], gpu_models=["A100"]),
                expected_gpus=8, min_pcie_gen=4, expected_tflops=312.0, min_hbm_gbps=1300.0,
                min_nccl_busbw_gbps=200.0, min_cpus=48, min_memory_gib=900),
        Profile(name="cpu", match=Match(instance_types=["cpu-96"]), expected_gpus=0, min_cpus=32,
                min_memory_gib=200),
    ]


class GateConfig(_Strict):
    max_attempts: int = Field(3, ge=1, le=20, description="test runs before a failing node is left out for good")
    retry_backoff_s: float = Field(30.0, ge=0, description="wait after a failed attempt (doubles each time)")
    pod_timeout_s: float = Field(1800.0, gt=0, description="a test pod not finished by then counts as a failure")
    max_concurrent: int = Field(500, ge=1, description="gate test pods in flight at once")
    pod_create_rate: float = Field(50.0, gt=0, description="test pods created per second (token bucket)")
    node_write_rate: float = Field(100.0, gt=0, description="node patches per second")
    workers: int = Field(8, ge=1, le=64)
    start_when_ready: bool = Field(True, description=(
        "start a joining node's test as soon as the node reports Ready: the test pod tolerates the "
        "not-ready NoSchedule taint that kube-controller-manager lifts after Ready (as DaemonSet pods "
        "do), so the test runs while that taint is lifted; false: wait until the taint is gone"))
    sim_duration_ms: int = Field(0, ge=0, description="simulation only: how long a simulated test runs")


class PeriodicConfig(_Strict):
    enabled: bool = True
    period_s: float = Field(7 * 86400.0, gt=0, description="every node re-tested at least this often")
    interval_s: float = Field(30.0, gt=0, description="how often the planner runs")
    max_concurrent: int = Field(20, ge=0, description="periodic test pods in flight at once")
    min_idle_s: float = Field(300.0, ge=0, description="a node must have had no real work for this long")
    pod_timeout_s: float = Field(1800.0, gt=0)
    priority_class: str = "fleetkeeper-preflight-periodic"
    priority: int = Field(-100, lt=0, description="below every real workload, so real work preempts")
    node_selector: dict[str, str] = Field(default_factory=dict, description="only these nodes are re-tested")
    fail_budget_per_hour: int = Field(20, ge=0, description="nodes taken out of service by periodic failures per hour")
    sim_duration_ms: int = Field(5000, ge=0, description="simulation only: how long a simulated test runs")


class WebhookConfig(_Strict):
    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = Field(9443, ge=0, le=65535)
    cert_dir: str = Field("", description="tls.crt/tls.key (e.g. a cert-manager Secret); empty: self-signed")
    auto_register: bool = Field(True, description="apply the MutatingWebhookConfiguration at start")
    url_host: str = Field("", description="register by URL https://<url_host>:<port>; empty: by Service")
    service_name: str = "fleetkeeper-preflight-webhook"
    failure_policy: Literal["Fail", "Ignore"] = "Fail"
    exempt_labels: dict[str, str] = Field(default_factory=dict, description="nodes with all of these labels are not gated")
    object_selector: dict = Field(default_factory=dict, description="raw objectSelector of the registration")


class PreflightConfig(_Strict):
    simulate: Literal["auto", "always", "never"] = "auto"
    fault_file: str = Field("", description="fault plan for simulation; empty: core.faults.default_fault_file()")
    namespace: str = Field("", description="where test pods run; empty: the manager's namespace")
    image: str = "ghcr.io/fleetkeeper/fleetkeeper:latest"
    service_account: str = "fleetkeeper-preflight-runner"
    key_secret: str = "fleetkeeper-preflight-key"
    node_selector: dict[str, str] = Field(default_factory=dict, description="gate only nodes with these labels")
    history_entries: int = Field(5, ge=1, le=20, description="results kept per node (annotation) and per GPU")
    history_shards: int = Field(16, ge=1, le=256, description="ConfigMaps holding per-GPU history")
    profiles: list[Profile] = Field(default_factory=default_profiles)
    default_profile: Profile = Profile(name="default", expected_gpus=0)
    gate: GateConfig = GateConfig()
    periodic: PeriodicConfig = PeriodicConfig()
    webhook: WebhookConfig = WebhookConfig()

    @model_validator(mode="after")
    def _unique(self) -> "PreflightConfig":
        seen: set[str] = set()
        for p in self.profiles:
            if p.name in seen:
                raise ValueError(f"profile name {p.name!r} is used twice")
            seen.add(p.name)
        return self

    def profile_for(self, instance_type: str = "", gpu_model: str = "") -> Profile:
        for p in self.profiles:
            if instance_type and instance_type in p.match.instance_types:
                return p
        for p in self.profiles:
            if gpu_model and any(m.lower() in gpu_model.lower() for m in p.match.gpu_models):
                return p
        return self.default_profile

    def profile_named(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        if name == self.default_profile.name:
            return self.default_profile
        from fleetkeeper.core.errors import ConfigError

        raise ConfigError("profile", [("profile", name, f"unknown profile; known: {[p.name for p in self.profiles]}")])


def load_config(data: object, source: str) -> PreflightConfig:
    return load_model(PreflightConfig, data if data is not None else {}, source)


def parse_config(text: str, source: str) -> PreflightConfig:
    return load_config(parse_yaml(text, source), source)
