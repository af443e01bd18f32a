"""Configuration: defaults, and every bad input named with its path."""

from __future__ import annotations

import pytest

from fleetkeeper.capacity.config import load_config, load_config_text
from fleetkeeper.core.errors import ConfigError


def test_defaults():
    cfg = load_config(None, "defaults")
    assert [p.name for p in cfg.balloons.pools] == ["gpu", "cpu"]
    assert cfg.balloons.priority < 0 and cfg.in_tree and not cfg.coscheduling


@pytest.mark.parametrize("text,path", [
    ("balloons: {priority: 0}", "balloons.priority"),
    ("balloons: {pools: [{name: gpu}, {name: gpu}]}", "balloons"),
    ("balloons: {pools: [{name: Bad_Name}]}", "balloons.pools[0].name"),
    ("balloons: {pools: [{name: gpu, resource: tpu}]}", "balloons.pools[0].resource"),
    ("balloons: {pools: [{name: gpu, max_nodes: -1}]}", "balloons.pools[0].max_nodes"),
    ("balloons: {tolerations: [{operator: Exists}]}", "balloons.tolerations"),
    ("balloons: {tolerations: [{key: a, operator: In}]}", "balloons.tolerations"),
    ("gangs: {backend: volcano}", "gangs.backend"),
    ("gangs: {bare_pod_settle_seconds: -1}", "gangs.bare_pod_settle_seconds"),
    ("gang: {}", "gang"),
])
def test_bad_config_names_the_field(text, path):
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "test.yaml")
    assert any(p[0] == path for p in exc.value.problems), exc.value.problems


def test_bad_yaml():
    with pytest.raises(ConfigError) as exc:
        load_config_text("balloons: [", "cm")
    assert "line" in exc.value.problems[0][0]


def test_backends():
    assert load_config({"gangs": {"backend": "both"}}, "x").coscheduling
    assert not load_config({"gangs": {"backend": "coscheduling"}}, "x").in_tree
