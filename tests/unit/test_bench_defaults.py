"""`make bench` runs every bench/bench_*.py with no arguments: each must have a default for every option (a
required option or a positional argument stops `make bench` at that file, and every benchmark after it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHES = sorted((Path(__file__).resolve().parents[2] / "bench").glob("bench_*.py"))


def argument_problems(source: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        nargs = next((kw.value.value for kw in node.keywords if kw.arg == "nargs" and isinstance(kw.value, ast.Constant)),
                     None)
        if names and not names[0].startswith("-") and nargs not in ("?", "*"):  # an optional positional is fine
            problems.append(f"line {node.lineno}: positional argument {names[0]!r}")
        for kw in node.keywords:
            if kw.arg == "required" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                problems.append(f"line {node.lineno}: {names[0] if names else '?'} is required")
    return problems


def test_the_check_finds_a_required_option_and_a_positional_one():
    src = 'ap.add_argument("--part", choices=("a",), required=True)\nap.add_argument("nodes")\n' \
          'ap.add_argument("--ok", default=1, required=False)\nap.add_argument("files", nargs="*")'
    assert argument_problems(src) == ["line 1: --part is required", "line 2: positional argument 'nodes'"]


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: p.name)
def test_every_benchmark_runs_without_arguments(path):
    assert argument_problems(path.read_text()) == []
