"""A tiny node in network namespaces, for the netns tests, the demo and the
benchmark: two pods and an "internet" joined to a "host" router by veth pairs.

    pod-a 10.1.0.2 --- pa0 10.1.0.1 \\
                                  host (forwarding) up0 203.0.113.1 --- 203.0.113.2 internet
    pod-b 10.2.0.2 --- pb0 10.2.0.1 /

The "internet" is a documentation address (203.0.113.0/24) inside our own
namespace. Nothing routes out of the namespaces, and traffic is only ever sent
to addresses of these namespaces. Every namespace name starts with ``fkt-``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass

INTERNET_IP = "203.0.113.2"
UPLINK = "up0"
POD_A_IP = "10.1.0.2"
POD_B_IP = "10.2.0.2"
# wire bytes per TCP payload byte at MTU 1500 with timestamps: (1448 + 52 + 14) / 1448;
# HTB counts whole frames, the receiver counts payload
WIRE_OVERHEAD = 1514 / 1448


def unavailable_reason() -> str | None:
    """Why real namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (Debian package iproute2)"
    if not any(shutil.which(f"iptables-{b}-save") for b in ("nft", "legacy")):
        return "iptables is not installed (Debian package iptables)"
    probe = f"fkt-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns add' fails: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def available_backends() -> list[str]:
    return [b for b in ("nft", "legacy") if shutil.which(f"iptables-{b}-save") and shutil.which(f"iptables-{b}-restore")]


def _sh(*argv: str) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


@dataclass
class Topology:
    tag: str

    @property
    def host(self) -> str:
        return f"fkt-{self.tag}-host"

    @property
    def pod_a(self) -> str:
        return f"fkt-{self.tag}-pa"

    @property
    def pod_b(self) -> str:
        return f"fkt-{self.tag}-pb"

    @property
    def internet(self) -> str:
        return f"fkt-{self.tag}-inet"

    @property
    def namespaces(self) -> list[str]:
        return [self.host, self.pod_a, self.pod_b, self.internet]

    @classmethod
    def create(cls) -> "Topology":
        t = cls(uuid.uuid4().hex[:6])
        try:
            t._build()
        except Exception:
            t.destroy()
            raise
        return t

    def _link(self, ns_a: str, if_a: str, ip_a: str, ns_b: str, if_b: str, ip_b: str) -> None:
        tmp_a, tmp_b = f"fk{uuid.uuid4().hex[:8]}", f"fk{uuid.uuid4().hex[:8]}"
        _sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _sh("ip", "link", "set", tmp_a, "netns", ns_a, "name", if_a)
        _sh("ip", "link", "set", tmp_b, "netns", ns_b, "name", if_b)
        for ns, ifn, ip in ((ns_a, if_a, ip_a), (ns_b, if_b, ip_b)):
            _sh("ip", "-n", ns, "addr", "add", ip, "dev", ifn)
            _sh("ip", "-n", ns, "link", "set", ifn, "up")

    def _build(self) -> None:
        for ns in self.namespaces:
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        self._link(self.host, "pa0", "10.1.0.1/24", self.pod_a, "eth0", f"{POD_A_IP}/24")
        self._link(self.host, "pb0", "10.2.0.1/24", self.pod_b, "eth0", f"{POD_B_IP}/24")
        self._link(self.host, UPLINK, "203.0.113.1/24", self.internet, "eth0", f"{INTERNET_IP}/24")
        _sh("ip", "netns", "exec", self.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _sh("ip", "-n", self.pod_a, "route", "add", "default", "via", "10.1.0.1")
        _sh("ip", "-n", self.pod_b, "route", "add", "default", "via", "10.2.0.1")
        _sh("ip", "-n", self.internet, "route", "add", "10.0.0.0/8", "via", "203.0.113.1")

    def destroy(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# A bounded TCP sink and source, run inside namespaces with the same Python.
_SINK = r"""
import json, socket, sys, time
host, port, limit_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(1); s.settimeout(limit_s)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(limit_s)
total = 0; marks = []; t0 = None
while True:
    try:
        b = c.recv(262144)
    except socket.timeout:
        break
    if not b:
        break
    now = time.monotonic()
    if t0 is None: t0 = now
    total += len(b); marks.append((now - t0, total))
print(json.dumps({"bytes": total, "marks": marks[::max(1, len(marks)//400)] + marks[-1:]}), flush=True)
"""

_SOURCE = r"""
import json, socket, sys, time
host, port, nbytes, limit_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection((host, port), timeout=5)
c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
buf = b"x" * 65536; sent = 0; t0 = time.monotonic()
while sent < nbytes and time.monotonic() - t0 < limit_s:
    sent += c.send(buf[: min(len(buf), nbytes - sent)])
c.shutdown(socket.SHUT_WR)
c.settimeout(limit_s + 5)
try:
    c.recv(1)
except OSError:
    pass
c.close()
print(json.dumps({"sent": sent, "seconds": time.monotonic() - t0}), flush=True)
"""


@dataclass
class Transfer:
    sent: int
    received: int
    seconds: float
    marks: list[tuple[float, int]]

    def steady_rate_bps(self, skip_s: float = 0.5) -> float:
        """Receive rate in bit/s after the first ``skip_s`` (HTB's initial burst)."""
        pts = [m for m in self.marks if m[0] >= skip_s]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] <= 0:
            return 0.0
        return (pts[-1][1] - pts[0][1]) * 8 / (pts[-1][0] - pts[0][0])


async def transfer(src_ns: str, dst_ns: str, dst_ip: str, *, nbytes: int, limit_s: float,
                   port: int = 5201) -> Transfer:
    """Send at most ``nbytes`` for at most ``limit_s`` seconds from ``src_ns`` to ``dst_ip``
    (an address inside ``dst_ns``) over TCP, and report what the sink received."""
    sink = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", dst_ns, sys.executable, "-c", _SINK, dst_ip, str(port), str(limit_s + 10),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(sink.stdout.readline(), 10)  # type: ignore[union-attr]
        if line.strip() != b"ready":
            raise RuntimeError(f"sink did not start: {line!r} {(await sink.stderr.read())!r}")  # type: ignore[union-attr]
        src = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", src_ns, sys.executable, "-c", _SOURCE, dst_ip, str(port), str(nbytes),
            str(limit_s), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(src.communicate(), limit_s + 30)
        if src.returncode != 0:
            raise RuntimeError(f"source failed: {err.decode()[-500:]}")
        sout, serr = await asyncio.wait_for(sink.communicate(), limit_s + 30)
    finally:
        if sink.returncode is None:
            sink.kill()
            await sink.wait()
    s = json.loads(out)
    r = json.loads(sout.decode().strip().splitlines()[-1])
    return Transfer(s["sent"], r["bytes"], s["seconds"], [tuple(m) for m in r["marks"]])
