"""Label, taint, annotation and condition names shared by every component.

The domain is configurable (the article uses ``openai.com``); every name is
derived from it by :class:`Names`, so two installations with different
domains never collide.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DOMAIN = "fleetkeeper.io"
SYSTEM_NAMESPACE = "fleetkeeper-system"


@dataclass(frozen=True)
class Names:
    domain: str = DEFAULT_DOMAIN

    # --- node lifecycle
    @property
    def preflight(self) -> str:
        """Taint and label key of a node that has not passed validation yet."""
        return f"{self.domain}/preflight"

    @property
    def quarantine(self) -> str:
        """Taint key set by the remediation controller (value: the reason)."""
        return f"{self.domain}/quarantine"

    @property
    def team(self) -> str:
        """Taint and label key of a team's node (value: the team)."""
        return f"{self.domain}/team"

    @property
    def pool(self) -> str:
        """Label key of a node's pool (gpu, cpu)."""
        return f"{self.domain}/pool"

    @property
    def rack(self) -> str:
        return f"{self.domain}/rack"

    @property
    def gang(self) -> str:
        """Label on pods of a training job that must be scheduled all-or-nothing."""
        return f"{self.domain}/gang"

    @property
    def balloon(self) -> str:
        """Label on balloon pods (value: the pool): placeholders, not work."""
        return f"{self.domain}/balloon"

    @property
    def gang_min(self) -> str:
        """Annotation: minimum members of a gang (default: replicas)."""
        return f"{self.domain}/gang-min-members"

    @property
    def gang_gate(self) -> str:
        """Scheduling gate fleetkeeper's webhook puts on a held gang's members (``spec.schedulingGates``);
        removed when the gang's room is free."""
        return f"{self.domain}/gang-hold"

    @property
    def gang_opt_out(self) -> str:
        """Annotation on a workload that declares a gang (JobSet, MPIJob, ...): ``"false"``
        opts it out of gang scheduling."""
        return f"{self.domain}/gang-enabled"

    @property
    def requester(self) -> str:
        """Annotation stamped by the teams webhook on every workload it admits on CREATE:
        who created it and their teams (JSON), never what the author wrote."""
        return f"{self.domain}/requester"

    def is_lifecycle_taint(self, key: str) -> bool:
        """fleetkeeper's own node-lifecycle taints (preflight, quarantine, gates, ...):
        every taint key under the domain except the team taint."""
        return key.startswith(f"{self.domain}/") and key != self.team

    @property
    def egress_limit(self) -> str:
        """Pod annotation: internet egress limit, e.g. ``100mbit``."""
        return f"{self.domain}/egress-limit"

    @property
    def validated_at(self) -> str:
        """Node annotation: last successful validation (RFC 3339)."""
        return f"{self.domain}/validated-at"

    @property
    def managed_by(self) -> str:
        return f"{self.domain}/managed-by"

    def condition(self, name: str) -> str:
        """Node condition types written by the node agent, NPD style (``GPUUnhealthy``)."""
        return name


ZONE_LABEL = "topology.kubernetes.io/zone"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
HOSTNAME_LABEL = "kubernetes.io/hostname"
GPU_RESOURCE = "nvidia.com/gpu"
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
