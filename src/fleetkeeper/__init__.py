"""fleetkeeper: run a research GPU cluster on Kubernetes at 7,500-node scale."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    # The version is defined once, in pyproject.toml; an installed package (wheel or
    # editable) carries it in its metadata.
    __version__ = _version("fleetkeeper")
except PackageNotFoundError:  # a source tree on sys.path without installing it
    __version__ = "0.0.0+unknown"
