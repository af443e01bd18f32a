"""Where a process's CPU went, from a py-spy raw profile (``py-spy record --format raw``).

    python bench/pyspy_summary.py PROFILE.txt [--top 25]

py-spy leaves idle threads out by default, so every sample is a moment the
process was running Python (or a C call made from it). Prints the share of
samples by the function at the top of the stack (self) and, for the frames
that matter in the relay, by inclusive share (any frame on the stack).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``module.py:func``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{Path(m['file']).name}:{m['func']}"


def load(path: str) -> list[tuple[list[str], int]]:
    out = []
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        out.append((frames, int(n)))
    return out


def summarise(samples: list[tuple[list[str], int]], top: int = 25,
              inclusive: tuple[str, ...] = ()) -> str:
    total = sum(n for _, n in samples) or 1
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, n in samples:
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"{total} samples"]
    lines.append("  self (top of stack):")
    lines += [f"    {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    keys = [f for f, _ in incl.most_common()] if not inclusive else \
        [f for f in incl if any(k in f for k in inclusive)]
    keys = sorted(keys, key=lambda f: -incl[f])[:top]
    lines.append("  inclusive (anywhere on the stack):")
    lines += [f"    {incl[f] / total:6.1%}  {f}" for f in keys]
    return "\n".join(lines)


RELAY_FRAMES = ("server.py:", "hub.py:", "web_protocol.py:", "web_request.py:", "base_events.py:_accept",
                "selector_events.py:_accept", "informer.py:", "views.py:", "client_reqrep.py:", "streams.py:",
                "orjson", "http_writer.py:", "web_response.py:", "kube.py:", "metrics.py:", "collector",
                "log", "admission.py:")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", nargs="+")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    for p in a.profile:
        print(f"== {p}")
        print(summarise(load(p), a.top, RELAY_FRAMES))


if __name__ == "__main__":
    main()
