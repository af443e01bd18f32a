"""``fleetkeeper fault``: inject and clear simulated faults (local control plane)."""

from fleetkeeper.health.cli import fault_app as app  # noqa: F401
