"""The one YAML parser for configuration refuses what could hurt before expanding it."""

from __future__ import annotations

import tracemalloc

import pytest

from fleetkeeper.core.config import parse_yaml
from fleetkeeper.core.errors import ConfigError

# nested aliases: 9 levels x 9 references expand to 9**9 (387 million) strings
BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_nested_alias_bomb_is_refused_before_expansion_with_a_short_error():
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as ei:
            parse_yaml(BOMB, "configmap x/y key config.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(ei.value)
    assert "anchor &a is not allowed" in msg and "line 1" in msg, msg
    assert len(msg) < 1000, len(msg)
    assert peak < 5 * 1024 * 1024, peak  # nothing was expanded


def test_alias_without_anchor_on_the_value_is_refused_too():
    with pytest.raises(ConfigError, match=r"alias \*x is not allowed"):
        parse_yaml("a: *x\n", "s")


@pytest.mark.parametrize("text,words", [
    ("teams: []\nteams: [x]\n", "duplicate key 'teams' (first at line 1)"),
    ("a:\n  b: 1\n  b: 2\n", "duplicate key 'b'"),
    ("base: {x: 1}\nother:\n  <<: {x: 1}\n", "merge keys"),
    ("a: 1\n---\nb: 2\n", "more than one YAML document"),
    ("a: [1, 2\n", "not valid YAML"),
    ("a: !!python/object:os.system x\n", "not valid YAML"),
])
def test_refused_documents_name_the_problem(text, words):
    with pytest.raises(ConfigError) as ei:
        parse_yaml(text, "configmap ns/cm key config.yaml")
    assert words in str(ei.value) and "configmap ns/cm key config.yaml" in str(ei.value)


def test_oversized_and_too_deep_documents_are_refused():
    with pytest.raises(ConfigError, match="document too large"):
        parse_yaml("a: " + "x" * (1024 * 1024), "s")
    with pytest.raises(ConfigError, match="too large"):
        parse_yaml("a: 1234567890\n", "s", max_bytes=10)
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        parse_yaml("[" * 100_000 + "]" * 100_000, "s")


def test_ordinary_documents_still_parse():
    assert parse_yaml("teams:\n  - {team: a, count: 2}\nmembership: {a: {groups: [g]}}\n", "s") == {
        "teams": [{"team": "a", "count": 2}], "membership": {"a": {"groups": ["g"]}}}
    assert parse_yaml("", "s") is None
    assert parse_yaml("---\na: 1\n", "s") == {"a": 1}


def _loaders():
    from fleetkeeper.capacity.config import load_config_text
    from fleetkeeper.health.policy import load_policy
    from fleetkeeper.lifecycle.config import load_lifecycle
    from fleetkeeper.preflight.config import parse_config as preflight
    from fleetkeeper.relay.settings import parse_config as relay
    from fleetkeeper.teams.config import parse_config as teams

    return {"teams": lambda t: teams(t, "teams", "fleetkeeper.io"), "capacity": lambda t: load_config_text(t, "c"),
            "health": lambda t: load_policy(t, "h"), "lifecycle": lambda t: load_lifecycle(t, "l"),
            "preflight": lambda t: preflight(t, "p"), "relay": lambda t: relay(t, "r")}


@pytest.mark.parametrize("name", ["teams", "capacity", "health", "lifecycle", "preflight", "relay"])
def test_every_configmap_loader_refuses_the_bomb_and_duplicates(name):
    load = _loaders()[name]
    with pytest.raises(ConfigError, match="anchor &a is not allowed"):
        load(BOMB)
    with pytest.raises(ConfigError, match="duplicate key"):
        load("a: 1\na: 2\n")
