"""Each agent check against recorded inputs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from fleetkeeper.health.checks import DiskCheck, GpuCheck, KernelEvents, NetworkCheck, Target, parse_target
from fleetkeeper.health.cloud import MaintenanceCheck, parse_aws, parse_azure, parse_gce
from fleetkeeper.health.gpu import FakeGpuBackend, parse_dcgm_xids
from fleetkeeper.health.kernlog import KernelLog, scan

KMSG = """\
6,1201,5123456789,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=2231, name=python3, GPU has fallen off the bus.
4,1202,5123456790,-;NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.
[ 7812.123456] NVRM: Xid (PCI:0000:86:00): 48, pid=2231, name=python3, An uncorrectable double bit error
[ 7813.000001] NVRM: Xid (PCI:0000:86:00): 13, pid=9, name=app, Graphics SM Warp Exception
[ 7900.5] blk_update_request: I/O error, dev nvme1n1, sector 123456 op 0x1:(WRITE) flags 0x0
[ 7901.5] Buffer I/O error on dev loop3, logical block 0, async page read
"""


def test_kernel_log_scan_xids_and_io_errors():
    xids, ios = scan(KMSG.splitlines())
    assert [(x.pci, x.code) for x in xids] == [("PCI:0000:3b:00", 79), ("PCI:0000:86:00", 48), ("PCI:0000:86:00", 13)]
    assert [e.device for e in ios] == ["nvme1n1", "loop3"]


def test_kernel_log_incremental_and_partial_lines(tmp_path):
    f = tmp_path / "kmsg"
    f.write_text("[ 1.0] hello\n[ 2.0] NVRM: Xid (PCI:0000:3b:00): 7")
    log = KernelLog(f)
    assert log.read_new() == ["[ 1.0] hello"]
    with f.open("a") as fh:
        fh.write("9, pid=1, GPU has fallen off the bus.\n")
    new = log.read_new()
    assert len(new) == 1 and scan(new)[0][0].code == 79
    assert log.read_new() == []


def _gpu(**kw):
    be = FakeGpuBackend.healthy(8)
    return be


@pytest.mark.parametrize("change,reason", [
    ({"ecc_uncorrected_volatile": 3}, "UncorrectableECC"),
    ({"remap_pending": True}, "RemapPending"),
    ({"retired_pages_pending": True}, "RemapPending"),
    ({"remap_failure": True}, "RowRemapFailure"),
    ({"retired_pages_dbe": 64}, "RetiredPagesExceeded"),
    ({"lost": True}, "GPULost"),
])
def test_gpu_check_nvml_fault_values(change, reason):
    be = FakeGpuBackend.healthy(8)
    be.set(2, **change)
    found = {f.type: f for f in GpuCheck(be, expected=8 if reason != "GPULost" else 0).check()}
    assert found["GPUUnhealthy"].problem and found["GPUUnhealthy"].reason == reason
    assert not found["GPUXidError"].problem


def test_gpu_check_healthy_missing_and_xids_from_all_sources(tmp_path):
    be = FakeGpuBackend.healthy(8)
    found = {f.type: f for f in GpuCheck(be, expected=8).check()}
    assert not found["GPUUnhealthy"].problem and not found["GPUXidError"].problem
    be.remove(7)
    f = tmp_path / "kmsg"
    f.write_text(KMSG)
    be.set(0, xids=(94,))
    chk = GpuCheck(be, expected=8, kernel=KernelEvents(KernelLog(f)), dcgm_xids=lambda: {"3": 74})
    found = {x.type: x for x in chk.check()}
    assert found["GPUUnhealthy"].reason == "GPUMissing" and "7 of 8 GPUs present" in found["GPUUnhealthy"].message
    assert found["GPUXidError"].problem
    assert found["GPUXidError"].reason == "Xid48,Xid74,Xid79,Xid94"  # 13 is an application error: ignored


def test_dcgm_exporter_metrics_parse():
    text = ('# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered.\n'
            '# TYPE DCGM_FI_DEV_XID_ERRORS gauge\n'
            'DCGM_FI_DEV_XID_ERRORS{gpu="0",UUID="GPU-a",device="nvidia0",Hostname="n1"} 0\n'
            'DCGM_FI_DEV_XID_ERRORS{gpu="1",UUID="GPU-b",device="nvidia1",Hostname="n1"} 79\n')
    assert parse_dcgm_xids(text) == {"1": 79}


def _mounts(tmp_path: Path, ro: bool) -> Path:
    (tmp_path / "var/lib/kubelet").mkdir(parents=True)
    m = tmp_path / "mounts"
    m.write_text(f"/dev/nvme0n1p1 / ext4 rw,relatime 0 0\n"
                 f"/dev/nvme1n1 /var/lib/kubelet xfs {'ro' if ro else 'rw'},noatime 0 0\n")
    return m


def test_disk_full_and_read_only_from_mount_table(tmp_path):
    m = _mounts(tmp_path, ro=True)
    usage = {str(tmp_path / "var/lib/kubelet"): (100, 97, 3), str(tmp_path) + "/": (100, 10, 90)}
    chk = DiskCheck(("/", "/var/lib/kubelet"), 95.0, tmp_path, m, usage=lambda p: usage.get(p, (100, 10, 90)))
    reasons = sorted(f.reason for f in chk.check() if f.problem)
    assert reasons == ["DiskFull", "ReadOnlyFilesystem"]
    ok = DiskCheck(("/var/lib/kubelet",), 98.0, tmp_path, _mounts(tmp_path / "b", ro=False) if False else m,
                   usage=lambda p: (100, 10, 90))
    # read-only remains a problem even when there is space
    assert [f.reason for f in ok.check()] == ["ReadOnlyFilesystem"]


def test_disk_io_errors_from_kernel_log(tmp_path):
    m = _mounts(tmp_path, ro=False)
    k = tmp_path / "kmsg"
    k.write_text(KMSG)
    chk = DiskCheck(("/var/lib/kubelet",), 95.0, tmp_path, m, kernel=KernelEvents(KernelLog(k)),
                    usage=lambda p: (100, 1, 99))
    f = chk.check()
    assert [x.reason for x in f] == ["IOErrors"] and "nvme1n1" in f[0].message and "loop3" not in f[0].message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_disk_real_tmpfs_full_and_read_only(tmp_path):
    mnt = tmp_path / "scratch"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount not permitted here")
    try:
        (mnt / "fill").write_bytes(b"\0" * (1024 * 1024 - 8192))
        chk = DiskCheck((str(mnt),), 90.0, Path("/"), Path("/proc/mounts"))
        assert "DiskFull" in [f.reason for f in chk.check() if f.problem]
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert "ReadOnlyFilesystem" in [f.reason for f in chk.check() if f.problem]
    finally:
        subprocess.run(["umount", str(mnt)])


async def test_network_check_tcp_targets():
    async def handle(r, w):
        w.close()
    import asyncio
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        up = NetworkCheck((Target("127.0.0.1", port),), timeout=1)
        assert not (await up.check())[0].problem
        down = NetworkCheck((Target("127.0.0.1", port), Target("127.0.0.1", 1)), timeout=1, max_failed_fraction=0.4)
        f = (await down.check())[0]
        assert f.problem and f.reason == "TargetsUnreachable" and "127.0.0.1:1" in f.message
        tolerant = NetworkCheck((Target("127.0.0.1", port), Target("127.0.0.1", 1)), timeout=1)
        assert not (await tolerant.check())[0].problem  # one of two peers down is not the node's fault
    finally:
        srv.close()
    assert parse_target("api=10.0.0.1:6443") == Target("10.0.0.1", 6443, "api")
    with pytest.raises(ValueError):
        parse_target("nohost")


async def test_network_check_samples_peers_from_a_file(tmp_path):
    import asyncio
    import random

    from fleetkeeper.health.checks import PeerSource

    async def handle(r, w):
        w.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    peers = tmp_path / "peers"
    try:
        peers.write_text(f"# peers of node-a\nnode-a=127.0.0.1:1\nb=127.0.0.1:{port}\n127.0.0.1:{port}\n\n")
        src = PeerSource(file=peers, exclude=("node-a",))
        assert [str(t) for t in await src.peers()] == ["b", f"127.0.0.1:{port}"]  # never itself
        chk = NetworkCheck(timeout=1, peers=src, peer_sample=2, rng=random.Random(1))
        f = (await chk.check())[0]
        assert not f.problem and f.message.startswith("2/2 targets reachable")
        # the ConfigMap is updated (the kubelet rewrites the file): the new list is used
        peers.write_text("c=127.0.0.1:1\nd=127.0.0.1:2\n")
        f = (await chk.check())[0]
        assert f.problem and "c: " in f.message and "d: " in f.message
        # a peer list that cannot be read: no peers probed, the node is not called unreachable
        peers.unlink()
        f = (await chk.check())[0]
        assert not f.problem and "peer list" in f.message and src.error
        # bare hosts get the default port; IPv6 with a port in brackets
        peers.write_text("10.0.0.7\n[fd00::1]:22\n")
        assert [(t.host, t.port) for t in await PeerSource(file=peers, port=9100).peers()] == \
            [("10.0.0.7", 9100), ("fd00::1", 22)]
    finally:
        srv.close()


async def test_peer_dns_is_resolved_at_most_every_refresh():
    from fleetkeeper.health.checks import PeerSource

    calls = []
    now = [0.0]

    async def resolver(name):
        calls.append(name)
        return ["10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.9"]
    src = PeerSource(dns="agents.fleetkeeper-system.svc", exclude=("10.0.0.9",), refresh=600, resolver=resolver,
                     clock=lambda: now[0])
    assert [t.host for t in await src.peers()] == ["10.0.0.1", "10.0.0.2"]
    now[0] = 599
    await src.peers()
    assert len(calls) == 1
    now[0] = 601
    await src.peers()
    assert len(calls) == 2
    with pytest.raises(ValueError):
        PeerSource()


# --- recorded cloud documents -------------------------------------------------------
AZURE = {"DocumentIncarnation": 2, "Events": [
    {"EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventStatus": "Scheduled", "EventType": "Reboot",
     "ResourceType": "VirtualMachine", "Resources": ["vm-7"], "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
     "Description": "Virtual machine is going to be restarted as requested by authorized user.",
     "EventSource": "User", "DurationInSeconds": 7},
    {"EventId": "x2", "EventStatus": "Scheduled", "EventType": "Freeze", "ResourceType": "VirtualMachine",
     "Resources": ["vm-8"], "NotBefore": "", "Description": "", "EventSource": "Platform", "DurationInSeconds": 9}]}
AWS_SCHED = [{"NotBefore": "21 Jan 2019 09:00:43 GMT", "Code": "system-reboot", "Description": "scheduled reboot",
              "EventId": "instance-event-0d59937288b749b32", "NotAfter": "21 Jan 2019 09:17:23 GMT",
              "State": "active"},
             {"NotBefore": "1 Jan 2019", "Code": "instance-stop", "Description": "old", "EventId": "e2",
              "NotAfter": "", "State": "completed"}]
AWS_SPOT = {"action": "terminate", "time": "2017-09-18T08:22:00Z"}


def test_cloud_parsers():
    f = parse_azure(AZURE, "vm-7")
    assert f.problem and f.reason == "AzureReboot" and "602d9444" in f.message
    assert parse_azure(AZURE, "vm-8").reason == "AzureFreeze"
    assert not parse_azure({"DocumentIncarnation": 1, "Events": []}).problem
    assert parse_aws(AWS_SCHED, None).reason == "AWSReboot"
    assert parse_aws(json.dumps(AWS_SCHED), json.dumps(AWS_SPOT)).reason == "AWSTerminate"
    assert not parse_aws([AWS_SCHED[1]], None).problem  # completed events are history
    assert parse_gce("MIGRATE_ON_HOST_MAINTENANCE").reason == "GCEMigrate"
    assert parse_gce("TERMINATE_ON_HOST_MAINTENANCE").reason == "GCETerminate"
    assert not parse_gce("NONE").problem


@pytest.fixture
async def metadata_server():
    seen: list[tuple[str, dict]] = []

    async def azure(req):
        seen.append((req.path_qs, dict(req.headers)))
        if req.headers.get("Metadata") != "true" or req.query.get("api-version") != "2020-07-01":
            return web.Response(status=400)
        return web.json_response(AZURE)

    async def token(req):
        seen.append((req.path, dict(req.headers)))
        return web.Response(text="tok-123")

    async def aws_sched(req):
        if req.headers.get("X-aws-ec2-metadata-token") != "tok-123":
            return web.Response(status=401)
        return web.json_response(AWS_SCHED)

    async def aws_spot(req):
        if req.headers.get("X-aws-ec2-metadata-token") != "tok-123":
            return web.Response(status=401)
        return web.Response(status=404)

    async def gce(req):
        if req.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403)
        return web.Response(text="TERMINATE_ON_HOST_MAINTENANCE")

    async def gce_pre(req):
        return web.Response(text="FALSE")

    app = web.Application()
    app.router.add_get("/metadata/scheduledevents", azure)
    app.router.add_put("/latest/api/token", token)
    app.router.add_get("/latest/meta-data/events/maintenance/scheduled", aws_sched)
    app.router.add_get("/latest/meta-data/spot/instance-action", aws_spot)
    app.router.add_get("/computeMetadata/v1/instance/maintenance-event", gce)
    app.router.add_get("/computeMetadata/v1/instance/preempted", gce_pre)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_maintenance_check_against_local_metadata_server(metadata_server):
    base, seen = metadata_server
    az = (await MaintenanceCheck("azure", base, vm_name="vm-7").check())[0]
    assert az.problem and az.reason == "AzureReboot"
    aws = (await MaintenanceCheck("aws", base).check())[0]
    assert aws.problem and aws.reason == "AWSReboot"
    assert any(p == "/latest/api/token" and h.get("X-aws-ec2-metadata-token-ttl-seconds") for p, h in seen)
    gce = (await MaintenanceCheck("gce", base).check())[0]
    assert gce.problem and gce.reason == "GCETerminate"
    down = (await MaintenanceCheck("azure", "http://127.0.0.1:1", timeout=0.5).check())[0]
    assert not down.problem and down.reason == "MetadataUnavailable"
