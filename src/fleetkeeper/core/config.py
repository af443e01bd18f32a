"""User-facing configuration: parse, validate, and report every problem with
its field path, the bad value and what is allowed.

``load_model(Model, data, source)`` turns pydantic's errors into one
:class:`errors.ConfigError`; ``parse_yaml`` turns YAML syntax errors into the
same error with the line number.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ValidationError

from fleetkeeper.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_model(model: type[M], data: Any, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            msg = e["msg"]
            ctx = e.get("ctx") or {}
            if "expected" in ctx:
                msg += f"; allowed: {ctx['expected']}"
            problems.append((_path(e["loc"]), e.get("input"), msg))
        raise ConfigError(source, problems) from None


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, text[:80], f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None


# --- durations: 30s, 10m, 2h, 7d or a number of seconds ---------------------------
_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v < 0:
            raise ValueError("must be >= 0")
        return float(v)
    if isinstance(v, str):
        m = _DUR.match(v)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)]
    raise ValueError("expected a duration such as 30s, 10m, 2h, 7d or a number of seconds")


def human(seconds: float) -> str:
    """7d, 2h, 30m, 45s: the largest unit that divides evenly, else seconds."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
