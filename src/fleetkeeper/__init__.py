"""fleetkeeper: run a research GPU cluster on Kubernetes at 7,500-node scale."""

__version__ = "0.1.0"
