"""Names of the preflight component's own labels and annotations (all under the domain)."""

from __future__ import annotations

from dataclasses import dataclass

from fleetkeeper.core.domain import Names

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
SIM_RESULT = "fleetkeeper.io/sim-result"
SIM_MESSAGE = "fleetkeeper.io/sim-message"
SIM_DELAY = "fleetkeeper.io/sim-delay"  # a Go duration, e.g. "5000ms"
# the taint kube-controller-manager keeps on a node until it is Ready (NoSchedule; NoExecute once it goes NotReady)
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
PENDING, FAILED = "pending", "failed"
GATE, PERIODIC = "gate", "periodic"


@dataclass(frozen=True)
class Keys:
    names: Names

    @property
    def gate(self) -> str:  # taint and label key
        return self.names.preflight

    def _k(self, suffix: str) -> str:
        return f"{self.names.domain}/preflight-{suffix}"

    # node annotations
    @property
    def attempts(self) -> str:
        return self._k("attempts")

    @property
    def failed_check(self) -> str:
        """Failing check(s) of the last attempt: what the health controller reads."""
        return self._k("failed-check")

    @property
    def retry_at(self) -> str:
        return self._k("retry-at")

    @property
    def last_pod(self) -> str:
        return self._k("last-pod")

    @property
    def history(self) -> str:
        return self._k("history")

    @property
    def gpus(self) -> str:
        """GPU UUIDs seen by the last result (the keys of the per-GPU history)."""
        return self._k("gpus")

    @property
    def gated_at(self) -> str:
        return self._k("gated-at")

    @property
    def validated_at(self) -> str:
        return self.names.validated_at

    # pod labels / annotations
    @property
    def pod_node(self) -> str:
        return self._k("node")

    @property
    def pod_kind(self) -> str:
        return self._k("kind")

    @property
    def nonce(self) -> str:
        return self._k("nonce")

    @property
    def profile(self) -> str:
        return self._k("profile")

    @property
    def component(self) -> str:
        return self.names.managed_by
