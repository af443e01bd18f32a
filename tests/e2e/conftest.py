"""End-to-end fixtures: ONE real local control plane per test session
(etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK),
started in a temporary directory on free loopback ports, and one namespace
per test.

``FLEETKEEPER_E2E_NODES`` (default 24) sets the simulated node count.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path

import pytest

from fleetkeeper.core import errors
from fleetkeeper.core.kube import NAMESPACES, Kube
from fleetkeeper.localcluster.cluster import LocalCluster

E2E_NODES = int(os.environ.get("FLEETKEEPER_E2E_NODES", "24"))


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster():
    directory = Path(tempfile.mkdtemp(prefix="fk-e2e-"))
    lc = LocalCluster(directory)
    import asyncio

    try:
        asyncio.run(lc.up(E2E_NODES, 8))
        yield lc
    finally:
        lc.down(purge=True)


@pytest.fixture
async def kube(cluster):
    k = await cluster.connect()
    yield k
    await k.close()


@pytest.fixture
async def namespace(kube, request):
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{secrets.token_hex(3)}"
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    try:
        await kube.delete(NAMESPACES, name)
    except errors.NotFound:
        pass


async def user_kube(cluster: LocalCluster, user: str) -> Kube:
    """A client authenticated as a test user (static token; groups from TEST_USERS)."""
    return await Kube.connect(str(cluster.user_kubeconfig(user)))
