"""Pure planning of fleetkeeper's accounting and marking rules (mangle table).

Layout (every chain is fleetkeeper's own; the built-in chains only get one
jump each, inserted first and marked with a comment)::

    INPUT   -> FLEETKEEPER-ACCT-INPUT    -i lo -j RETURN; -s <internal> -j RETURN; count traffic=internet-in scope=host
    OUTPUT  -> FLEETKEEPER-ACCT-OUTPUT   -o lo -j RETURN; -d <internal> -j RETURN; count traffic=internet-out scope=host
    FORWARD -> FLEETKEEPER-ACCT-FORWARD  -d <internal> -g FWD-DI; -g FWD-DX
               FLEETKEEPER-ACCT-FWD-DI   (dst internal) -s <internal> -g INTERNAL; -g INET-IN
               FLEETKEEPER-ACCT-FWD-DX   (dst outside)  -s <internal> -g INET-OUT
               FLEETKEEPER-ACCT-INET-IN  count scope=pods, then one rule per pod (-d ip)
               FLEETKEEPER-ACCT-INET-OUT count scope=pods, one rule per pod (-s ip), CLASSIFY rules of shaped pods
               FLEETKEEPER-ACCT-INTERNAL count scope=pods, per pod internal-out (-s ip) and internal-in (-d ip)

The classification chains make any number of internal ranges work without
marks. Counting rules have no target and carry a comment in the
``iptables-exporter`` convention, e.g.
``iptables-exporter fleetkeeper traffic=internet-out ns=ml pod=trainer-0 team=vision``.

Order matters only in the classification chains (INPUT/OUTPUT/FORWARD/FWD-*):
when one differs it is rewritten whole, carrying unchanged rules' counters.
The counting chains are order-free and are diffed rule by rule, so an
unchanged rule keeps its kernel counter exactly. Everything goes in one
``iptables-restore --noflush`` transaction.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import Counter as Multiset
from dataclasses import dataclass, field

from fleetkeeper.netacct.iptables import SaveDump, SavedRule, SavedTable, comment_of
from fleetkeeper.netacct.pods import PodInfo

TABLE = "mangle"
OWNER = "fleetkeeper"
EXPORTER_PREFIX = f"iptables-exporter {OWNER}"
JUMP_COMMENT = f"{OWNER} accounting"
SHAPE_PREFIX = f"{OWNER} shape"
CHAIN_PREFIX = "FLEETKEEPER-ACCT-"

CH_INPUT = "FLEETKEEPER-ACCT-INPUT"
CH_OUTPUT = "FLEETKEEPER-ACCT-OUTPUT"
CH_FORWARD = "FLEETKEEPER-ACCT-FORWARD"
CH_FWD_DI = "FLEETKEEPER-ACCT-FWD-DI"
CH_FWD_DX = "FLEETKEEPER-ACCT-FWD-DX"
CH_INET_IN = "FLEETKEEPER-ACCT-INET-IN"
CH_INET_OUT = "FLEETKEEPER-ACCT-INET-OUT"
CH_INTERNAL = "FLEETKEEPER-ACCT-INTERNAL"

HOOKS = {"INPUT": CH_INPUT, "OUTPUT": CH_OUTPUT, "FORWARD": CH_FORWARD}
ORDERED_CHAINS = (CH_INPUT, CH_OUTPUT, CH_FORWARD, CH_FWD_DI, CH_FWD_DX)
COUNTING_CHAINS = (CH_INET_IN, CH_INET_OUT, CH_INTERNAL)
ALL_CHAINS = ORDERED_CHAINS + COUNTING_CHAINS

DIRECTIONS = ("internet-in", "internet-out", "internal-in", "internal-out")
MAX_COMMENT = 255


def _short(name: str, room: int) -> str:
    """Fit a name into ``room`` characters, keeping it unique with a hash suffix."""
    if len(name) <= room:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:max(1, room - 9)]}~{digest}"


def pod_comment(traffic: str, pod: PodInfo) -> str:
    head = f"{EXPORTER_PREFIX} traffic={traffic} ns={pod.namespace} pod="
    tail = f" team={pod.team or 'none'}"
    return head + _short(pod.name, MAX_COMMENT - len(head) - len(tail)) + tail


def aggregate_comment(traffic: str, scope: str) -> str:
    return f"{EXPORTER_PREFIX} traffic={traffic} scope={scope}"


def shape_comment(pod: PodInfo, bucket: int, scope: str = "pod") -> str:
    head = f"{SHAPE_PREFIX} ns={pod.namespace} pod="
    tail = f" bucket={bucket} scope={scope}"
    return head + _short(pod.name, MAX_COMMENT - len(head) - len(tail)) + tail


def parse_exporter_comment(comment: str | None) -> dict[str, str] | None:
    """Labels of an ``iptables-exporter <owner> k=v ...`` comment (owner under "owner")."""
    if not comment or not comment.startswith("iptables-exporter "):
        return None
    parts = comment.split()
    if len(parts) < 2:
        return None
    labels = {"owner": parts[1]}
    for p in parts[2:]:
        k, sep, v = p.partition("=")
        if sep and k:
            labels[k] = v
    return labels


def parse_shape_comment(comment: str | None) -> dict[str, str] | None:
    if not comment or not comment.startswith(SHAPE_PREFIX + " "):
        return None
    out = {}
    for p in comment[len(SHAPE_PREFIX) + 1:].split():
        k, sep, v = p.partition("=")
        if sep:
            out[k] = v
    return out


@dataclass(frozen=True)
class Rule:
    chain: str
    tokens: tuple[str, ...]

    def render(self) -> str:
        out = []
        for i, t in enumerate(self.tokens):
            if i > 0 and self.tokens[i - 1] == "--comment":
                if '"' in t or "\n" in t:
                    raise ValueError(f"comment may not contain quotes or newlines: {t!r}")
                out.append(f'"{t}"')
            else:
                out.append(t)
        return " ".join(out)

    @property
    def comment(self) -> str | None:
        return comment_of(self.tokens)


def _c(comment: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", comment)


def _net(n: ipaddress.IPv4Network) -> str:
    return str(n)  # "10.0.0.0/8", "10.1.2.3/32": as iptables-save prints


@dataclass
class Desired:
    chains: dict[str, list[Rule]]
    jumps: dict[str, Rule]  # built-in hook -> the one jump rule


def desired_rules(pods: list[PodInfo], internal: tuple[ipaddress.IPv4Network, ...],
                  marks: dict[str, tuple[int, str]] | None = None, qdisc_major: str = "fee7") -> Desired:
    """The complete desired content of fleetkeeper's chains.

    ``marks`` maps pod key (ns/name) -> (bucket id, scope); those pods get a
    CLASSIFY rule on internet-bound packets (it sets the packet's priority to the
    bucket's HTB class) so the uplink's HTB queues them in their class.
    """
    marks = marks or {}
    ch: dict[str, list[Rule]] = {c: [] for c in ALL_CHAINS}

    def add(chain: str, *tokens: str) -> None:
        ch[chain].append(Rule(chain, tuple(tokens)))

    add(CH_INPUT, "-i", "lo", "-j", "RETURN")
    for n in internal:
        add(CH_INPUT, "-s", _net(n), "-j", "RETURN")
    add(CH_INPUT, *_c(aggregate_comment("internet-in", "host")))
    add(CH_OUTPUT, "-o", "lo", "-j", "RETURN")
    for n in internal:
        add(CH_OUTPUT, "-d", _net(n), "-j", "RETURN")
    add(CH_OUTPUT, *_c(aggregate_comment("internet-out", "host")))

    for n in internal:
        add(CH_FORWARD, "-d", _net(n), "-g", CH_FWD_DI)
    add(CH_FORWARD, "-g", CH_FWD_DX)
    for n in internal:
        add(CH_FWD_DI, "-s", _net(n), "-g", CH_INTERNAL)
    add(CH_FWD_DI, "-g", CH_INET_IN)
    for n in internal:
        add(CH_FWD_DX, "-s", _net(n), "-g", CH_INET_OUT)

    add(CH_INET_IN, *_c(aggregate_comment("internet-in", "pods")))
    add(CH_INET_OUT, *_c(aggregate_comment("internet-out", "pods")))
    add(CH_INTERNAL, *_c(aggregate_comment("internal", "pods")))
    for pod in sorted(pods, key=lambda p: p.key):
        ip = f"{pod.ip}/32"
        add(CH_INET_IN, "-d", ip, *_c(pod_comment("internet-in", pod)))
        add(CH_INET_OUT, "-s", ip, *_c(pod_comment("internet-out", pod)))
        add(CH_INTERNAL, "-s", ip, *_c(pod_comment("internal-out", pod)))
        add(CH_INTERNAL, "-d", ip, *_c(pod_comment("internal-in", pod)))
        mark = marks.get(pod.key)
        if mark is not None:
            bucket, scope = mark
            add(CH_INET_OUT, "-s", ip, *_c(shape_comment(pod, bucket, scope)), "-j", "CLASSIFY",
                "--set-class", f"{qdisc_major}:{bucket:04x}")

    jumps = {hook: Rule(hook, (*_c(JUMP_COMMENT), "-j", chain)) for hook, chain in HOOKS.items()}
    return Desired(ch, jumps)


# ---------------------------------------------------------------- planning

@dataclass
class RulePlan:
    create: list[str] = field(default_factory=list)                       # chains to declare
    rewrite: dict[str, list[tuple[Rule, int, int]]] = field(default_factory=dict)
    deletes: list[tuple[str, str]] = field(default_factory=list)          # (chain, saved spec)
    appends: list[tuple[Rule, int, int]] = field(default_factory=list)
    jump_deletes: list[tuple[str, str]] = field(default_factory=list)
    jump_inserts: list[Rule] = field(default_factory=list)
    drop_chains: list[str] = field(default_factory=list)                  # stale chains of ours
    kept: int = 0                                                          # rules left as they are

    @property
    def empty(self) -> bool:
        return not (self.create or self.rewrite or self.deletes or self.appends or self.jump_deletes
                    or self.jump_inserts or self.drop_chains)

    def render(self) -> str:
        """An ``iptables-restore --noflush --counters`` payload for the mangle table.

        Declaring a chain (``:NAME - [0:0]``) creates it, or flushes it when it
        exists: only chains being created or rewritten are declared."""
        lines = [f"*{TABLE}"]
        for name in [*self.create, *(c for c in self.rewrite if c not in self.create)]:
            lines.append(f":{name} - [0:0]")
        for chain, rules in self.rewrite.items():
            for rule, pk, by in rules:
                lines.append(f"[{pk}:{by}] -A {chain} {rule.render()}")
        for chain, spec in self.jump_deletes:
            lines.append(f"-D {chain} {spec}")
        for chain, spec in self.deletes:
            lines.append(f"-D {chain} {spec}")
        for rule, pk, by in self.appends:
            lines.append(f"[{pk}:{by}] -A {rule.chain} {rule.render()}")
        for rule in self.jump_inserts:
            lines.append(f"-I {rule.chain} 1 {rule.render()}")
        for name in self.drop_chains:
            lines.append(f"-F {name}")
        for name in self.drop_chains:
            lines.append(f"-X {name}")
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def summary(self) -> list[str]:
        out = [f"create chain {c}" for c in self.create]
        out += [f"rewrite chain {c} ({len(r)} rules)" for c, r in self.rewrite.items()]
        out += [f"delete jump in {c}: {s}" for c, s in self.jump_deletes]
        out += [f"delete {c}: {s}" for c, s in self.deletes]
        out += [f"add {r.chain}: {r.render()}" for r, _, _ in self.appends]
        out += [f"insert jump in {r.chain}: {r.render()}" for r in self.jump_inserts]
        out += [f"drop stale chain {c}" for c in self.drop_chains]
        return out


def _is_our_jump(rule: SavedRule) -> bool:
    return rule.comment == JUMP_COMMENT or (rule.target or "").startswith(CHAIN_PREFIX)


def plan(desired: Desired, observed: SaveDump) -> RulePlan:
    """What to change so the mangle table holds exactly ``desired`` in our chains,
    touching nothing else."""
    table: SavedTable = observed.table(TABLE)
    p = RulePlan()
    for name in ALL_CHAINS:
        want = desired.chains[name]
        have = table.chains.get(name)
        if have is None:
            p.create.append(name)
            p.appends.extend((r, 0, 0) for r in want)
            continue
        if name in ORDERED_CHAINS:
            if [r.tokens for r in have.rules] == [r.tokens for r in want]:
                p.kept += len(want)
                continue
            pool: dict[tuple[str, ...], list[SavedRule]] = {}
            for r in have.rules:
                pool.setdefault(r.tokens, []).append(r)
            rules = []
            for r in want:
                prev = pool.get(r.tokens)
                old = prev.pop(0) if prev else None
                rules.append((r, old.packets, old.bytes) if old else (r, 0, 0))
            p.rewrite[name] = rules
            continue
        wanted = Multiset(r.tokens for r in want)
        for r in have.rules:
            if wanted[r.tokens] > 0:
                wanted[r.tokens] -= 1
                p.kept += 1
            else:
                p.deletes.append((name, r.spec))
        for r in want:
            if wanted[r.tokens] > 0:
                wanted[r.tokens] -= 1
                p.appends.append((r, 0, 0))

    for hook, jump in desired.jumps.items():
        have = table.chains.get(hook)
        found = 0
        for r in have.rules if have else []:
            if r.tokens == jump.tokens and found == 0:
                found = 1
            elif _is_our_jump(r):
                p.jump_deletes.append((hook, r.spec))  # duplicates, stale targets
        if not found:
            p.jump_inserts.append(jump)

    for name in table.chains:
        if name.startswith(CHAIN_PREFIX) and name not in ALL_CHAINS:
            p.drop_chains.append(name)
    return p


def plan_uninstall(observed: SaveDump) -> RulePlan:
    """Remove every fleetkeeper chain and jump; nothing else."""
    table = observed.table(TABLE)
    p = RulePlan()
    for hook in HOOKS:
        for r in table.chains.get(hook).rules if hook in table.chains else []:
            if _is_our_jump(r):
                p.jump_deletes.append((hook, r.spec))
    p.drop_chains = [n for n in table.chains if n.startswith(CHAIN_PREFIX)]
    return p
