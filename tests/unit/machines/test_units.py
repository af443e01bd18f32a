"""providerID parsing, the ledger's pure verdicts, the configuration, and the command provider."""

from __future__ import annotations

import stat
import textwrap

import pytest

from fleetkeeper.core import errors
from fleetkeeper.machines.base import Machine, cloud_of, parse_aws, parse_azure, parse_gce
from fleetkeeper.machines.command import CommandProvider
from fleetkeeper.machines.config import load_config
from fleetkeeper.machines.ledger import Entry, decide_start, parse, render


def test_provider_ids():
    assert parse_aws("aws:///us-east-1a/i-0abc123").instance_id == "i-0abc123"
    assert parse_aws("aws:///i-0abc123").zone == ""
    g = parse_gce("gce://research/us-central1-a/gpu-a3-7x2k")
    assert (g.project, g.zone, g.name) == ("research", "us-central1-a", "gpu-a3-7x2k")
    a = parse_azure("azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/"
                    "virtualMachineScaleSets/ndv5/virtualMachines/12")
    assert (a.name, a.instance_id, a.vm_name) == ("ndv5", "12", "ndv5_12")
    v = parse_azure("azure:///subscriptions/s/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/gpu-1")
    assert (v.name, v.instance_id, v.vm_name) == ("gpu-1", "", "gpu-1")
    assert [cloud_of(x) for x in ("aws:///z/i-1", "gce://p/z/n", "kwok://n", "")] == ["aws", "gce", "", ""]
    assert Machine("n", "u").key == "node-uid://u"


def E(machine, uid, action, at, state="done"):
    return Entry(machine, uid, "n", action, at, state)


def test_ledger_verdicts():
    now = 100_000.0
    es = [E("aws:///z/i-1", "u1", "terminate", now - 10)]
    assert decide_start(es, "aws:///z/i-1", "u1", "terminate", now, max_per_hour=5, max_per_day=9).kind == "done"
    # replace after terminate of the same machine is the same action
    assert decide_start(es, "aws:///z/i-1", "u1", "replace", now, max_per_hour=5, max_per_day=9).kind == "done"
    # a reboot is a different action; a new Node (uid) of the same machine too
    assert decide_start(es, "aws:///z/i-1", "u1", "reboot", now, max_per_hour=5, max_per_day=9).kind == "new"
    assert decide_start(es, "aws:///z/i-1", "u2", "terminate", now, max_per_hour=5, max_per_day=9).kind == "new"
    started = [E("m", "u", "terminate", now, "started")]
    assert decide_start(started, "m", "u", "terminate", now, max_per_hour=5, max_per_day=9).kind == "resume"
    many = [E(f"m{i}", "u", "terminate", now - 60 * i) for i in range(5)]
    v = decide_start(many, "x", "u", "terminate", now, max_per_hour=5, max_per_day=9)
    assert v.kind == "limited" and "max_per_hour 5" in v.why
    old = [E(f"m{i}", "u", "terminate", now - 3700 - i) for i in range(9)]
    assert decide_start(old, "x", "u", "terminate", now, max_per_hour=5, max_per_day=9).kind == "limited"
    assert decide_start(old, "x", "u", "terminate", now, max_per_hour=5, max_per_day=10).kind == "new"
    # round trip, and an unreadable ledger refuses instead of forgetting
    assert parse({"actions": render(es, now)}) == es
    with pytest.raises(errors.Terminal, match="unreadable"):
        parse({"actions": "{not json"})


def test_config():
    assert load_config(None).provider == "kubernetes-node"
    assert load_config(None).kubernetes_node.allow_real is False
    c = load_config("provider: aws\naws: {region: us-west-2}\nmax_per_hour: 3", "cm")
    assert (c.provider, c.aws.region, c.max_per_hour) == ("aws", "us-west-2", 3)
    assert load_config("provider: aws", "cm", provider="karpenter").provider == "karpenter"
    assert load_config(None, provider="kubernetes-node").kubernetes_node.allow_real is True
    with pytest.raises(errors.ConfigError, match="--machine-provider"):
        load_config(None, provider="openstack")
    with pytest.raises(errors.ConfigError, match="provider"):
        load_config("provider: vsphere", "cm")
    with pytest.raises(errors.ConfigError, match="max_per_hour"):
        load_config("max_per_hour: -1", "cm")
    assert load_config("provider: command\ncommand: {argv: '/bin/x --y'}").command.argv == ["/bin/x", "--y"]


@pytest.fixture
def script(tmp_path):
    log = tmp_path / "calls"
    p = tmp_path / "machines.sh"
    p.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$1 $2 $3 dry=$FLEETKEEPER_DRY_RUN" >> {log}
        case "$2" in
          gone) echo "no such vm"; exit 3;;
          slow) echo "rate exceeded"; exit 4;;
          locked) echo "no permission"; exit 5;;
          broken) echo "boom"; exit 1;;
        esac
        [ "$1" = reboot ] && {{ echo "cannot reboot"; exit 2; }}
        echo "did $1 of $2"
        """))
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return CommandProvider([str(p)]), log


async def test_command_provider_exit_codes(script):
    cp, log = script
    m = Machine("n1", "u1", "metal://rack3/n1")
    out = await cp.terminate(m)
    assert out.message == "did terminate of n1"
    assert log.read_text().splitlines() == ["terminate n1 metal://rack3/n1 dry=0"]
    assert (await cp.terminate(Machine("gone", "u"))).gone is True
    with pytest.raises(errors.MachineThrottled, match="rate exceeded"):
        await cp.terminate(Machine("slow", "u"))
    with pytest.raises(errors.MachineForbidden, match="no permission"):
        await cp.replace(Machine("locked", "u"))
    with pytest.raises(errors.MachineFailed, match="exited 1: boom"):
        await cp.terminate(Machine("broken", "u"))
    with pytest.raises(errors.MachineUnsupported, match="cannot reboot"):
        await cp.reboot(m)
    await cp.terminate(m, dry_run=True)
    assert log.read_text().splitlines()[-1].endswith("dry=1")
    assert await cp.exists(m) is True and await cp.exists(Machine("gone", "u")) is False


async def test_concurrent_first_uses_build_one_actuator():
    """Several workers retiring nodes at once ask the configured provider together: one actuator is built
    (a second would register its metrics twice and fail after the caller recorded its request)."""
    import asyncio

    from prometheus_client import CollectorRegistry, Counter

    from fleetkeeper.machines.actuator import MachinesProvider

    registry = CollectorRegistry()
    built = []

    async def loader():
        await asyncio.sleep(0)  # the build awaits (it reads a ConfigMap): the other callers run meanwhile
        Counter("fleetkeeper_test_built_total", "one per build", registry=registry)  # raises when built twice
        built.append(object())
        return built[-1]

    prov = MachinesProvider(loader)
    got = await asyncio.gather(*(prov.ensure() for _ in range(8)))
    assert len(built) == 1 and all(g is built[0] for g in got)
