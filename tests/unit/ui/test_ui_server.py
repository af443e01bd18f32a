"""The fleet map's server parts that need no cluster: the timeline projection, what a page without
pod access receives, and the flags that keep it safe by default."""

from __future__ import annotations

from typer.testing import CliRunner

from fleetkeeper.cli.main import app
from fleetkeeper.ui.server import _nodes_only, event_item, loopback

runner = CliRunner()


def test_timeline_keeps_only_fleetkeeper_events():
    ev = {"metadata": {"uid": "u1", "name": "n1.abc", "creationTimestamp": "2026-01-01T00:00:00Z"},
          "reportingController": "fleetkeeper.io/health", "action": "Quarantine", "reason": "Quarantined",
          "type": "Warning", "regarding": {"kind": "Node", "name": "n1"}, "note": "ECC",
          "series": {"count": 3, "lastObservedTime": "2026-01-01T00:00:05Z"}}
    item = event_item(ev)
    assert item == {"id": "u1", "t": 1767225605.0, "controller": "health", "action": "Quarantine",
                    "reason": "Quarantined", "type": "Warning", "kind": "Node", "ns": "", "name": "n1",
                    "note": "ECC", "count": 3}
    assert event_item({**ev, "reportingController": "kubelet"}) is None
    assert event_item({**ev, "reportingController": ""}) is None


def test_a_page_without_pod_access_gets_no_pod_facts():
    cell = ["n1", "zone-a", "rack-1", "in-service", "alpha", 6, 8, ["ns/g1"]]
    assert _nodes_only(cell) == ["n1", "zone-a", "rack-1", "in-service", "alpha", None, 8, []]


def test_loopback_only_without_authentication():
    assert loopback("127.0.0.1") and loopback("::1") and loopback("localhost")
    assert not loopback("0.0.0.0") and not loopback("10.0.0.1") and not loopback("example.com")
    r = runner.invoke(app, ["ui", "--host", "0.0.0.0", "--auth", "none"])
    assert r.exit_code == 2 and "loopback" in r.output
    r = runner.invoke(app, ["ui", "--auth", "maybe"])
    assert r.exit_code == 2 and "maybe" in r.output
    r = runner.invoke(app, ["run", "--ui", "--ui-host", "10.1.2.3", "--ui-auth", "none", "--controllers", ""])
    assert r.exit_code == 2 and "loopback" in r.output


def test_panels_wait_longer_after_a_long_recomputation():
    """The budget/team panels read every node and pod: when that takes long (a large fleet) the next one waits
    in proportion, so the panels take at most a tenth of the process's time; a quick one keeps the interval."""
    from fleetkeeper.ui.server import panels_pause

    assert panels_pause(5.0, 0.1) == 5.0
    assert panels_pause(5.0, 4.0) == 36.0  # 4 s of work, then 36 s of rest
