"""``make demo`` exits non-zero when a scenario misses its outcome, and reads
each process's peak RSS and CPU seconds from the kernel."""

from __future__ import annotations

import asyncio
import os
import types
from pathlib import Path

from typer.testing import CliRunner

from fleetkeeper.cli import demo as D
from fleetkeeper.cli.main import app
from fleetkeeper.core.outcome import Outcome


def scenario(body):
    return types.SimpleNamespace(demo=body)


async def test_a_missed_claim_an_error_a_timeout_or_no_outcome_each_count_as_missed():
    async def met(ctx):
        o = Outcome()
        o.expect(True, "it worked")
        return o

    async def missed(ctx):
        o = Outcome()
        o.expect(True, "first")
        o.expect(False, "second", "seen 3 of 4")
        return o

    async def broken(ctx):
        raise RuntimeError("boom")

    async def silent(ctx):
        return None

    async def stuck(ctx):
        await asyncio.Event().wait()

    assert (await D.run_scenario(None, scenario(met), 60)).ok
    assert (await D.run_scenario(None, scenario(lambda ctx: asyncio.sleep(0, Outcome.skip("no binary"))), 60)).ok
    res = await D.run_scenario(None, scenario(missed), 60)
    assert not res.ok and [c.text for c in res.missed] == ["second"] and res.missed[0].seen == "seen 3 of 4"
    res = await D.run_scenario(None, scenario(broken), 60)
    assert not res.ok and "boom" in res.missed[0].seen
    assert not (await D.run_scenario(None, scenario(silent), 60)).ok
    assert not (await D.run_scenario(None, scenario(stuck), 0.01)).ok


def test_demo_command_exits_1_when_a_scenario_missed(monkeypatch):
    async def fake_run_demo(**kw):
        return False
    monkeypatch.setattr(D, "run_demo", fake_run_demo)
    assert CliRunner().invoke(app, ["demo"]).exit_code == 1

    async def fake_ok(**kw):
        return True
    monkeypatch.setattr(D, "run_demo", fake_ok)
    assert CliRunner().invoke(app, ["demo"]).exit_code == 0


def test_process_usage_reads_the_high_water_mark_and_cpu_ticks(tmp_path: Path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text("Name:\tetcd\nVmHWM:\t  204800 kB\nVmRSS:\t  1000 kB\n")
    # comm may contain spaces and parentheses; utime=300, stime=200 ticks
    (tmp_path / "42" / "stat").write_text("42 (kube (x) y) S 1 42 42 0 -1 4194560 0 0 0 0 300 200 0 0 20 0 1 0\n")
    rss, cpu = D.proc_usage(42, tmp_path)
    assert rss == 204800 * 1024 and cpu == 500 / os.sysconf("SC_CLK_TCK")
    assert D.proc_usage(43, tmp_path) == (None, None)
    rows = dict((n, (r, c)) for n, r, c in D.process_usage({"self": os.getpid()}))
    assert rows["self"][0] > 0 and rows["fleetkeeper (this process)"][0] > 0
