"""Fixtures for the teams end-to-end tests (helpers in teams_e2e_helpers)."""

from __future__ import annotations

import pytest

from teams_e2e_helpers import TeamsEnv


@pytest.fixture
async def env(cluster, kube, namespace):
    e = TeamsEnv(cluster, kube, namespace)
    await e.setup()
    try:
        yield e
    finally:
        await e.teardown()
