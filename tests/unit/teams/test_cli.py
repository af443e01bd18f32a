"""The teams CLI: clear errors, exit 2 for configuration problems."""

from __future__ import annotations

from typer.testing import CliRunner

from fleetkeeper.teams.cli import app

runner = CliRunner()


def test_validate_good_and_bad(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("teams:\n  - {team: team-a, nodeSelector: {fleetkeeper.io/pool: gpu}, count: 3}\n"
                    "membership:\n  team-a: {groups: [team-a]}\n")
    r = runner.invoke(app, ["validate", str(good)])
    assert r.exit_code == 0 and "teams: team-a" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("teams:\n  - {team: Team_A, count: -2}\n")
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2
    assert "teams[0].team" in r.output and "teams[0].count" in r.output and "-2" in r.output


def test_unreadable_kubeconfig_is_a_config_error(tmp_path):
    r = runner.invoke(app, ["status", "--kubeconfig", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "kubeconfig" in r.output


def test_bad_flag_names_the_flag():
    r = runner.invoke(app, ["apply", "--limit", "zero"])
    assert r.exit_code == 2 and "--limit" in r.output


def test_webhook_show_prints_both_configurations():
    r = runner.invoke(app, ["webhook", "show", "--service", "fk/teams:9443"])
    assert r.exit_code == 0
    assert "MutatingWebhookConfiguration" in r.output and "ValidatingWebhookConfiguration" in r.output
    assert '"failurePolicy": "Fail"' in r.output
