"""The aws provider with the real boto3 client against moto's EC2 and Auto Scaling
emulator (a separate process, spoken to over HTTP)."""

from __future__ import annotations

import base64
import json
import urllib.request

import boto3
import pytest
from botocore.exceptions import ClientError

from fleetkeeper.core import errors
from fleetkeeper.machines.aws import AwsProvider
from fleetkeeper.machines.base import Machine


def machine(iid: str, node: str = "n1") -> Machine:
    return Machine(node, "uid-" + node, f"aws:///us-east-1a/{iid}")


def moto_calls(url: str) -> list[dict]:
    """Requests moto recorded since recording started: (Action, params)."""
    raw = urllib.request.urlopen(url + "/moto-api/recorder/download-recording").read().decode()
    out = []
    for line in raw.splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def actions(calls: list[dict]) -> list[tuple[str, str]]:
    found = []
    for c in calls:
        body = c.get("body") or ""
        if c.get("body_encoded"):
            body = base64.b64decode(body).decode()
        params = dict(p.split("=", 1) for p in body.split("&") if "=" in p) if isinstance(body, str) else {}
        if "Action" in params:
            found.append((params["Action"], body))
    return found


@pytest.fixture
def aws(moto_url, aws_env):
    urllib.request.urlopen(urllib.request.Request(moto_url + "/moto-api/reset", method="POST")).read()
    sess = boto3.session.Session(region_name="us-east-1")
    ec2 = sess.client("ec2", endpoint_url=moto_url)
    asg = sess.client("autoscaling", endpoint_url=moto_url)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    loose = [i["InstanceId"] for i in ec2.run_instances(ImageId=ami, MinCount=3, MaxCount=3,
                                                         InstanceType="p4d.24xlarge")["Instances"]]
    ec2.create_launch_template(LaunchTemplateName="gpu", LaunchTemplateData={"ImageId": ami,
                                                                             "InstanceType": "p4d.24xlarge"})
    asg.create_auto_scaling_group(AutoScalingGroupName="gpu-pool", LaunchTemplate={"LaunchTemplateName": "gpu"},
                                  MinSize=0, MaxSize=5, DesiredCapacity=2, AvailabilityZones=["us-east-1a"])
    grouped = [i["InstanceId"] for i in
               asg.describe_auto_scaling_groups(AutoScalingGroupNames=["gpu-pool"])["AutoScalingGroups"][0]["Instances"]]
    for op in ("reset-recording", "start-recording"):
        urllib.request.urlopen(urllib.request.Request(moto_url + f"/moto-api/recorder/{op}", method="POST")).read()
    p = AwsProvider(region="us-east-1", endpoint_url=moto_url)
    yield p, ec2, asg, loose, grouped
    p.close()
    ec2.close()
    asg.close()
    urllib.request.urlopen(urllib.request.Request(moto_url + "/moto-api/recorder/stop-recording",
                                                  method="POST")).read()


def states(ec2, ids):
    res = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in res for i in r["Instances"]}


async def test_terminate_standalone_instance_exactly_that_one(aws, moto_url):
    p, ec2, _, loose, _ = aws
    out = await p.terminate(machine(loose[1]))
    assert out.gone is False and loose[1] in out.message
    st = states(ec2, loose)
    assert st[loose[1]] in ("shutting-down", "terminated")
    assert st[loose[0]] == "running" and st[loose[2]] == "running"
    calls = actions(moto_calls(moto_url))
    terms = [b for a, b in calls if a == "TerminateInstances"]
    assert len(terms) == 1 and f"InstanceId.1={loose[1]}" in terms[0]
    assert not [a for a, _ in calls if a == "TerminateInstanceInAutoScalingGroup"]
    assert await p.exists(machine(loose[1])) is False
    assert await p.exists(machine(loose[0])) is True
    # a second terminate is answered from the instance's state: no second call
    again = await p.terminate(machine(loose[1]))
    assert again.gone is True
    assert len([a for a, _ in actions(moto_calls(moto_url)) if a == "TerminateInstances"]) == 1


async def test_terminate_in_asg_keeps_desired_capacity(aws, moto_url):
    p, ec2, asg, _, grouped = aws
    target = grouped[0]
    out = await p.terminate(machine(target))
    assert "gpu-pool" in out.message and "without decrementing" in out.message
    calls = actions(moto_calls(moto_url))
    tig = [b for a, b in calls if a == "TerminateInstanceInAutoScalingGroup"]
    assert len(tig) == 1 and f"InstanceId={target}" in tig[0] and "ShouldDecrementDesiredCapacity=false" in tig[0]
    assert not [a for a, _ in calls if a == "TerminateInstances"]
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["gpu-pool"])["AutoScalingGroups"][0]
    assert g["DesiredCapacity"] == 2
    members = {i["InstanceId"] for i in g["Instances"]}
    assert target not in members and len(members) == 2  # the group launched a replacement
    assert states(ec2, [grouped[1]])[grouped[1]] == "running"


async def test_replace_outside_a_group_is_refused(aws):
    p, ec2, _, loose, _ = aws
    with pytest.raises(errors.MachineUnsupported):
        await p.replace(machine(loose[0]))
    assert states(ec2, [loose[0]])[loose[0]] == "running"


async def test_reboot_and_dry_run(aws, moto_url):
    p, ec2, _, loose, grouped = aws
    out = await p.reboot(machine(loose[2]))
    assert "rebooted" in out.message
    reboots = [b for a, b in actions(moto_calls(moto_url)) if a == "RebootInstances"]
    assert len(reboots) == 1 and f"InstanceId.1={loose[2]}" in reboots[0] and "DryRun=true" not in reboots[0]
    for m in (machine(loose[0]), machine(grouped[1])):
        d = await p.terminate(m, dry_run=True)
        assert d.dry_run and "would" in d.message
    assert set(states(ec2, loose + grouped).values()) == {"running"}
    calls = actions(moto_calls(moto_url))
    assert not [a for a, _ in calls if a == "TerminateInstanceInAutoScalingGroup"]
    assert all("DryRun=true" in b for a, b in calls if a == "TerminateInstances")


async def test_unknown_instance(aws):
    p, *_ = aws
    out = await p.terminate(machine("i-0123456789abcdef0"))
    assert out.gone is True
    with pytest.raises(errors.MachineNotFound):
        await p.reboot(machine("i-0123456789abcdef0"))
    with pytest.raises(errors.MachineNotFound):
        await p.terminate(Machine("n", "u", "gce://p/z/n"))


@pytest.mark.parametrize("code,cls", [("RequestLimitExceeded", errors.MachineThrottled),
                                      ("UnauthorizedOperation", errors.MachineForbidden),
                                      ("InvalidInstanceID.NotFound", errors.MachineNotFound),
                                      ("InternalError", errors.MachineFailed)])
def test_error_mapping(code, cls, aws_env):
    p = AwsProvider(region="us-east-1", endpoint_url="http://127.0.0.1:9")
    exc = ClientError({"Error": {"Code": code, "Message": "m"}}, "TerminateInstances")
    err = p._error(machine("i-1"), exc)
    p.close()
    assert type(err) is cls and code in str(err)
    assert isinstance(err, errors.Temporary) == (cls is not errors.MachineNotFound)
