"""Per-pod and per-namespace internet egress shaping (pure planning + tc I/O).

Where the shaping happens, and why: a pod's egress arrives at the host side of
its veth as *ingress*, and ingress can only be policed (dropped), not queued.
fleetkeeper therefore shapes on the egress of the node's **uplink** (the
interface internet-bound traffic leaves by). In mangle FORWARD, after the
packet has been classified as internet-bound (destination outside every
internal range), a ``CLASSIFY --set-class fee7:<bucket>`` rule marks it with
its bucket's HTB class (in ``skb->priority``; HTB reads that before any
filter). The uplink's root HTB qdisc has one class per bucket
(``rate == ceil == limit``). No tc filter and no packet-mark bits are needed:
``fw`` and u32 ``match mark`` depend on kernel options (cls_fw,
CONFIG_CLS_U32_MARK) that are often missing — without the latter u32 silently
ignores the mark and matches everything — and mark bits collide with CNIs.
HTB's ``default 0`` sends every unclassified packet, i.e. all
cluster-internal traffic, straight out (HTB's direct queue): internal traffic
is never queued behind a limit.

Buckets: a namespace limit gives all the namespace's pods on the node one
shared bucket; otherwise a team policy gives each pod of the team its own
bucket at the team's rate. A pod annotation ``<domain>/egress-limit`` may only
lower that: under a team limit the pod's bucket gets the smaller of the two;
under a namespace limit the pod stays in the shared bucket (a bucket of its
own would add to the namespace's total); with no policy the annotation is the
pod's own limit. A malformed annotation is reported and ignored: the pod
keeps the limit it already has (never above the policy), or falls back to
the policy.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from fleetkeeper.core.domain import Names
from fleetkeeper.netacct.iptables import Runner, SaveDump
from fleetkeeper.netacct.pods import PodInfo
from fleetkeeper.netacct.rules import CH_INET_OUT, TABLE, parse_shape_comment
from fleetkeeper.netacct.settings import RATE_HELP, RateError, format_rate, parse_rate

log = logging.getLogger("fleetkeeper.netacct")

QDISC_MAJOR = "fee7"
FILTER_PRIO = 10
U32_TABLE = "800"
# root qdiscs the kernel installs by itself; anything else belongs to someone
DEFAULT_ROOT_KINDS = {"noqueue", "pfifo_fast", "mq", "fq_codel", "noop", "fq", "sfq", "pfifo", "bfifo", ""}


@dataclass(frozen=True)
class Bucket:
    key: str          # "pod:<ns>/<name>" or "ns:<ns>"
    rate_bps: int
    scope: str        # "pod" or "namespace"
    namespace: str
    pod: str = ""     # "" for namespace buckets
    source: str = ""  # annotation, namespace-policy, team-policy, kept


@dataclass
class Problem:
    namespace: str
    pod: str
    value: str
    message: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}: {self.message} (got {self.value!r})"


@dataclass
class Limits:
    buckets: dict[str, Bucket] = field(default_factory=dict)
    pod_bucket: dict[str, str] = field(default_factory=dict)   # pod key -> bucket key
    problems: list[Problem] = field(default_factory=list)


def resolve_limits(pods: list[PodInfo], names: Names, team_limits: dict[str, str],
                   namespace_limits: dict[str, str], previous: dict[str, int]) -> Limits:
    """Decide each pod's bucket. ``previous`` is bucket key -> rate currently applied
    (from the uplink's classes), used to keep a limit when its annotation turns bad.

    The annotation is written by the pod's author, so it may only *lower* what
    the policy gives: under a team limit (one bucket per pod) the pod gets
    ``min(annotation, team limit)``; under a namespace limit (one bucket shared
    by the namespace's pods) the pod stays in the shared bucket, because a
    bucket of its own would add its rate to the namespace's; a higher value is
    reported and not applied. Without any policy limit the annotation is the
    pod's limit."""
    out = Limits()
    ann = names.egress_limit
    for pod in sorted(pods, key=lambda p: p.key):
        pkey = f"pod:{pod.key}"
        ns_limit = namespace_limits.get(pod.namespace)
        team_limit = team_limits.get(pod.team) if pod.team and ns_limit is None else None
        raw = pod.annotations.get(ann)
        if raw is not None:
            try:
                bps = parse_rate(raw)
            except RateError as exc:
                out.problems.append(Problem(pod.namespace, pod.name, raw,
                                            f"annotation {ann}: {exc}; annotation ignored"))
                if pkey in previous and ns_limit is None:  # bad value: keep what already works
                    kept = previous[pkey] if team_limit is None else min(previous[pkey], parse_rate(team_limit))
                    out.buckets[pkey] = Bucket(pkey, kept, "pod", pod.namespace, pod.name, "kept")
                    out.pod_bucket[pod.key] = pkey
                    continue
            else:
                if ns_limit is not None:
                    out.problems.append(Problem(pod.namespace, pod.name, raw, (
                        f"annotation {ann}: namespace {pod.namespace} shares one limit of {ns_limit} between its "
                        "pods; a pod cannot take a bucket of its own (it would add to the namespace's limit); "
                        "annotation not applied")))
                elif team_limit is not None and bps > parse_rate(team_limit):
                    out.problems.append(Problem(pod.namespace, pod.name, raw, (
                        f"annotation {ann}: may only lower team {pod.team}'s limit of {team_limit}; "
                        f"{team_limit} applies")))
                    out.buckets[pkey] = Bucket(pkey, parse_rate(team_limit), "pod", pod.namespace, pod.name,
                                               "team-policy")
                    out.pod_bucket[pod.key] = pkey
                    continue
                else:
                    out.buckets[pkey] = Bucket(pkey, bps, "pod", pod.namespace, pod.name, "annotation")
                    out.pod_bucket[pod.key] = pkey
                    continue
        if ns_limit is not None:
            nkey = f"ns:{pod.namespace}"
            out.buckets[nkey] = Bucket(nkey, parse_rate(ns_limit), "namespace",
                                       pod.namespace, "", "namespace-policy")
            out.pod_bucket[pod.key] = nkey
        elif team_limit is not None:
            out.buckets[pkey] = Bucket(pkey, parse_rate(team_limit), "pod", pod.namespace,
                                       pod.name, "team-policy")
            out.pod_bucket[pod.key] = pkey
    return out


def observed_bucket_ids(dump: SaveDump) -> dict[str, int]:
    """Bucket key -> id from the CLASSIFY rules' comments, so ids survive restarts."""
    ids: dict[str, int] = {}
    chain = dump.table(TABLE).chains.get(CH_INET_OUT)
    for r in chain.rules if chain else []:
        c = parse_shape_comment(r.comment)
        if not c or not c.get("bucket", "").isdigit():
            continue
        key = f"ns:{c.get('ns')}" if c.get("scope") == "namespace" else f"pod:{c.get('ns')}/{c.get('pod')}"
        ids.setdefault(key, int(c["bucket"]))
    return ids


def allocate(buckets: dict[str, Bucket], observed: dict[str, int], max_id: int) -> tuple[dict[str, int], list[str]]:
    """Stable ids 1..max_id: a bucket keeps its observed id; new ones take the lowest free."""
    ids: dict[str, int] = {}
    used: set[int] = set()
    for key in sorted(buckets):
        i = observed.get(key)
        if i is not None and 1 <= i <= max_id and i not in used:
            ids[key] = i
            used.add(i)
    overflow = []
    nxt = 1
    for key in sorted(buckets):
        if key in ids:
            continue
        while nxt in used:
            nxt += 1
        if nxt > max_id:
            overflow.append(key)
            continue
        ids[key] = nxt
        used.add(nxt)
    return ids, overflow


# ---------------------------------------------------------------- tc state

@dataclass
class ClassStats:
    rate_bps: int
    sent_bytes: int = 0
    sent_packets: int = 0
    dropped: int = 0
    overlimits: int = 0


@dataclass
class TcState:
    root_kind: str = ""
    root_handle: str = ""
    classes: dict[int, ClassStats] = field(default_factory=dict)   # bucket id -> stats
    filters: set[int] = field(default_factory=set)                 # bucket ids with a filter

    @property
    def ours(self) -> bool:
        return self.root_kind == "htb" and self.root_handle == f"{QDISC_MAJOR}:"


_RATE_TXT = re.compile(r"^([0-9.]+)([KMGT]?)bit$")
_MULT = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _tc_rate(text: str) -> int:
    m = _RATE_TXT.match(text)
    if not m:
        raise ValueError(f"unparseable tc rate {text!r}")
    return int(round(float(m.group(1)) * _MULT[m.group(2)]))


_QDISC_RE = re.compile(r"^qdisc (\S+) (\S+) root\b")
_CLASS_RE = re.compile(rf"^class htb {QDISC_MAJOR}:([0-9a-f]+) .*?\brate (\S+)")
_SENT_RE = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)")
_FILTER_RE = re.compile(rf"\bfh {U32_TABLE}::([0-9a-f]+)\b.*\bflowid {QDISC_MAJOR}:([0-9a-f]+)")


def parse_tc(qdisc_out: str, class_out: str, filter_out: str) -> TcState:
    """Parse ``tc qdisc show``, ``tc -s class show`` and ``tc filter show`` of one device."""
    st = TcState()
    for line in qdisc_out.splitlines():
        m = _QDISC_RE.match(line.strip())
        if m:
            st.root_kind, st.root_handle = m.group(1), m.group(2)
            break
    current: ClassStats | None = None
    for line in class_out.splitlines():
        line = line.strip()
        m = _CLASS_RE.match(line)
        if m:
            current = ClassStats(_tc_rate(m.group(2)))
            st.classes[int(m.group(1), 16)] = current
            continue
        if line.startswith("class "):
            current = None
            continue
        m = _SENT_RE.search(line)
        if m and current is not None:
            current.sent_bytes, current.sent_packets = int(m.group(1)), int(m.group(2))
            current.dropped, current.overlimits = int(m.group(3)), int(m.group(4))
    for line in filter_out.splitlines():
        m = _FILTER_RE.search(line)
        if m and m.group(1) == m.group(2):
            st.filters.add(int(m.group(1), 16))
    return st


class ForeignQdisc(Exception):
    pass


def _quantum(bps: int) -> int:
    return max(1514, min(200_000, bps // 8 // 10))


def plan_tc(dev: str, desired: dict[int, int], observed: TcState) -> list[str]:
    """``tc -batch`` lines that make ``dev`` shape exactly ``desired`` (bucket id -> bit/s).

    Raises :class:`ForeignQdisc` rather than replace a root qdisc someone else set up."""
    major = QDISC_MAJOR
    if not observed.ours and observed.root_kind not in DEFAULT_ROOT_KINDS:
        raise ForeignQdisc(f"{dev} has a root qdisc {observed.root_kind} {observed.root_handle} "
                           "that fleetkeeper did not install; not replacing it")
    if not desired:
        return [f"qdisc del dev {dev} root"] if observed.ours else []
    cmds = []
    if not observed.ours:
        cmds.append(f"qdisc replace dev {dev} root handle {major}: htb default 0")
        observed = TcState(root_kind="htb", root_handle=f"{major}:")
    for i in sorted(observed.filters):  # fleetkeeper classifies with CLASSIFY, never filters
        cmds.append(f"filter del dev {dev} parent {major}: protocol ip prio {FILTER_PRIO} "
                    f"handle {U32_TABLE}::{i:x} u32")
    for i in sorted(set(observed.classes) - set(desired)):
        cmds.append(f"class del dev {dev} classid {major}:{i:x}")
    for i, bps in sorted(desired.items()):
        have = observed.classes.get(i)
        if have is None or abs(have.rate_bps - bps) > max(1000, bps // 100):
            cmds.append(f"class replace dev {dev} parent {major}: classid {major}:{i:x} htb "
                        f"rate {bps}bit ceil {bps}bit quantum {_quantum(bps)}")
    return cmds


class Tc:
    def __init__(self, runner: Runner):
        self.runner = runner

    async def observe(self, dev: str) -> TcState:
        from fleetkeeper.core.errors import Temporary

        q = await self.runner.run(["tc", "qdisc", "show", "dev", dev, "root"])
        if q.rc != 0:
            raise Temporary(f"tc qdisc show dev {dev}: {q.stderr.strip()[:200]}", delay=10)
        c = await self.runner.run(["tc", "-s", "class", "show", "dev", dev])
        f = await self.runner.run(["tc", "filter", "show", "dev", dev, "parent", f"{QDISC_MAJOR}:"])
        return parse_tc(q.stdout, c.stdout if c.rc == 0 else "", f.stdout if f.rc == 0 else "")

    async def apply(self, cmds: list[str]) -> None:
        from fleetkeeper.core.errors import Temporary

        if not cmds:
            return
        res = await self.runner.run(["tc", "-batch", "-"], stdin="\n".join(cmds) + "\n")
        if res.rc != 0:
            raise Temporary(f"tc -batch failed: {res.stderr.strip()[:300]}", delay=5)


__all__ = ["Bucket", "Limits", "Problem", "resolve_limits", "observed_bucket_ids", "allocate", "parse_tc",
           "plan_tc", "Tc", "TcState", "ClassStats", "ForeignQdisc", "RATE_HELP", "format_rate"]
