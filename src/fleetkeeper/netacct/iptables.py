"""``iptables-save -c`` parsing, back-end detection, and applying a restore
payload with ``iptables-restore --noflush --counters`` (atomic per table).

Everything that touches the system goes through an injected
:class:`Runner`, so unit tests replay recorded output without root.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
from dataclasses import dataclass, field
from typing import Protocol

from fleetkeeper.core.errors import ConfigError, Temporary

log = logging.getLogger("fleetkeeper.netacct")


# ---------------------------------------------------------------- running commands

@dataclass
class CommandResult:
    rc: int
    stdout: str
    stderr: str


class Runner(Protocol):
    async def run(self, argv: list[str], stdin: str | None = None) -> CommandResult: ...


class SubprocessRunner:
    """Runs commands for real; ``netns`` runs them inside ``ip netns exec <netns>``."""

    def __init__(self, netns: str | None = None, timeout_s: float = 30.0):
        self.netns = netns
        self.timeout_s = timeout_s

    async def run(self, argv: list[str], stdin: str | None = None) -> CommandResult:
        full = (["ip", "netns", "exec", self.netns] if self.netns else []) + argv
        try:
            proc = await asyncio.create_subprocess_exec(
                *full, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            return CommandResult(127, "", f"{full[0]}: command not found")
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return CommandResult(124, "", f"{' '.join(full)}: timed out after {self.timeout_s}s")
        return CommandResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


# ---------------------------------------------------------------- parsing

_COUNTER_RE = re.compile(r"^\[(\d+):(\d+)\]\s+(.*)$")
_CHAIN_RE = re.compile(r"^:(\S+)\s+(\S+)(?:\s+\[(\d+):(\d+)\])?\s*$")


_TOKEN_RE = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_UNESCAPE_RE = re.compile(r"\\(.)")


def split_spec(spec: str) -> list[str]:
    """Split a saved rule body: iptables-save double-quotes (with backslash
    escapes) only words with spaces or quotes; shlex would be 10x slower."""
    if '"' not in spec and "'" not in spec and "\\" not in spec:
        return spec.split()
    if "'" in spec:
        return shlex.split(spec)
    out = []
    for m in _TOKEN_RE.finditer(spec):
        out.append(_UNESCAPE_RE.sub(r"\1", m.group(1)) if m.group(1) is not None else m.group(2))
    return out


def canonical_tokens(spec: str | list[str]) -> tuple[str, ...]:
    """A rule body (after ``-A CHAIN``) as comparable tokens: quoting removed,
    bare host addresses given ``/32`` (iptables-save prints them that way)."""
    toks = split_spec(spec) if isinstance(spec, str) else list(spec)
    out = []
    prev = ""
    for t in toks:
        if prev in ("-s", "-d", "--source", "--destination") and "/" not in t and not t.startswith("!"):
            t = f"{t}/32"
        out.append(t)
        prev = t
    return tuple(out)


def comment_of(tokens: tuple[str, ...]) -> str | None:
    for i, t in enumerate(tokens[:-1]):
        if t == "--comment":
            return tokens[i + 1]
    return None


@dataclass
class SavedRule:
    chain: str
    spec: str                  # the rule body exactly as saved (after "-A CHAIN ")
    tokens: tuple[str, ...]
    packets: int = 0
    bytes: int = 0

    @property
    def comment(self) -> str | None:
        return comment_of(self.tokens)

    @property
    def target(self) -> str | None:
        for i, t in enumerate(self.tokens[:-1]):
            if t in ("-j", "-g", "--jump", "--goto"):
                return self.tokens[i + 1]
        return None


@dataclass
class SavedChain:
    name: str
    policy: str  # ACCEPT/DROP for built-in chains, "-" for user chains
    packets: int = 0
    bytes: int = 0
    rules: list[SavedRule] = field(default_factory=list)


@dataclass
class SavedTable:
    name: str
    chains: dict[str, SavedChain] = field(default_factory=dict)

    def rules(self) -> list[SavedRule]:
        return [r for c in self.chains.values() for r in c.rules]


@dataclass
class SaveDump:
    tables: dict[str, SavedTable] = field(default_factory=dict)

    def table(self, name: str) -> SavedTable:
        return self.tables.get(name) or SavedTable(name)


class ParseError(ValueError):
    pass


def parse_save(text: str) -> SaveDump:
    """Parse ``iptables-save [-c]`` output of either back end (legacy or nft)."""
    dump = SaveDump()
    table: SavedTable | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = SavedTable(line[1:].strip())
            dump.tables[table.name] = table
            continue
        if line == "COMMIT":
            table = None
            continue
        if table is None:
            raise ParseError(f"line {lineno}: {line[:80]!r} outside a table")
        if line.startswith(":"):
            m = _CHAIN_RE.match(line)
            if not m:
                raise ParseError(f"line {lineno}: bad chain line {line[:80]!r}")
            table.chains[m.group(1)] = SavedChain(m.group(1), m.group(2), int(m.group(3) or 0),
                                                  int(m.group(4) or 0))
            continue
        packets = nbytes = 0
        m = _COUNTER_RE.match(line)
        if m:
            packets, nbytes, line = int(m.group(1)), int(m.group(2)), m.group(3)
        if not line.startswith("-A "):
            raise ParseError(f"line {lineno}: expected '-A CHAIN ...', got {line[:80]!r}")
        parts = line[3:].split(None, 1)
        chain = parts[0]
        spec = parts[1] if len(parts) > 1 else ""
        try:
            tokens = canonical_tokens(spec)
        except ValueError as exc:
            raise ParseError(f"line {lineno}: {exc}") from None
        if chain not in table.chains:  # tolerate a rule before its chain line
            table.chains[chain] = SavedChain(chain, "-")
        table.chains[chain].rules.append(SavedRule(chain, spec, tokens, packets, nbytes))
    return dump


# ---------------------------------------------------------------- the back end

BACKENDS = ("nft", "legacy")


class Iptables:
    """One back end's ``iptables-*-save`` / ``iptables-*-restore``."""

    def __init__(self, runner: Runner, backend: str):
        if backend not in BACKENDS:
            raise ConfigError("backend", [("backend", backend, "must be nft or legacy")])
        self.runner = runner
        self.backend = backend

    @property
    def save_cmd(self) -> str:
        return f"iptables-{self.backend}-save"

    @property
    def restore_cmd(self) -> str:
        return f"iptables-{self.backend}-restore"

    async def save_text(self, table: str = "mangle") -> str:
        """``iptables-save -c -t <table>`` as text: one call reads every rule's counters."""
        res = await self.runner.run([self.save_cmd, "-c", "-t", table])
        if res.rc != 0:
            raise Temporary(f"{self.save_cmd} failed ({res.rc}): {res.stderr.strip()[:300]}", delay=5)
        return res.stdout

    async def save(self, table: str = "mangle") -> SaveDump:
        text = await self.save_text(table)
        try:
            return parse_save(text)
        except ParseError as exc:
            raise Temporary(f"{self.save_cmd}: unparseable output: {exc}", delay=5) from None

    async def restore(self, payload: str) -> None:
        """Apply ``payload`` atomically; other software's rules and chains are untouched."""
        res = await self.runner.run([self.restore_cmd, "-w", "5", "--noflush", "--counters"], stdin=payload)
        if res.rc != 0:
            raise Temporary(f"{self.restore_cmd} failed ({res.rc}): {res.stderr.strip()[:500]}", delay=5)


async def detect_backend(runner: Runner, wanted: str = "auto") -> str:
    """Pick the back end the node's other software uses, as Kubernetes'
    iptables-wrapper does: the one holding more rules; nft when tied."""
    if wanted != "auto":
        return wanted
    counts: dict[str, int] = {}
    for be in BACKENDS:
        res = await runner.run([f"iptables-{be}-save"])
        if res.rc == 0:
            counts[be] = sum(1 for line in res.stdout.splitlines() if line.startswith(("-A ", "[")))
    if not counts:
        raise Temporary("neither iptables-nft-save nor iptables-legacy-save works "
                        "(install Debian's iptables package)", delay=30)
    best = max(counts.values())
    choice = "nft" if counts.get("nft") == best else "legacy"
    log.info("iptables back end: %s (rules found: %s)", choice, counts)
    return choice
