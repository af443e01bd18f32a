"""The pods an eviction's Event names: as many as fit its budget, the rest counted, never a cut name."""

from fleetkeeper.health.controller import pod_list


def test_every_pod_named_when_they_fit():
    assert pod_list(["ns/a", "ns/b"]) == "ns/a, ns/b"
    assert pod_list([]) == ""


def test_the_rest_counted_once_the_budget_is_spent():
    keys = [f"team-a/train-rank-{i:04d}" for i in range(1000)]
    note = pod_list(keys)
    named = note.split(" and ")[0].split(", ")
    assert note.endswith(f" and {1000 - len(named)} more")
    assert named == keys[:len(named)] and 10 < len(named) < 30  # whole names only, about 500 characters
    assert len(note) <= 520


def test_the_first_pod_is_named_even_if_longer_than_the_budget():
    assert pod_list(["ns/" + "x" * 60, "ns/b"], budget=10) == "ns/" + "x" * 60 + " and 1 more"
