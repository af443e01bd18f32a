"""What a ``make demo`` scenario claims and whether it got there.

Each component's ``demo(ctx)`` returns an :class:`Outcome`: the claims it
checked (each met or missed, with what was seen) or why it was skipped. The
demo runner prints them and exits non-zero when any claim was missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Claim:
    text: str
    met: bool
    seen: str = ""


@dataclass
class Outcome:
    claims: list[Claim] = field(default_factory=list)
    skipped: str = ""  # why the scenario could not run here (not a miss)

    def expect(self, met: object, claim: str, seen: str = "") -> bool:
        """Record ``claim`` as met or missed; answer whether it was met."""
        self.claims.append(Claim(claim, bool(met), seen))
        return bool(met)

    @classmethod
    def skip(cls, why: str) -> "Outcome":
        return cls(skipped=why)

    @property
    def missed(self) -> list[Claim]:
        return [c for c in self.claims if not c.met]

    @property
    def ok(self) -> bool:
        return not self.missed
