"""The ``fleetkeeper`` command line (top layer: may import every component)."""
