"""User-facing configuration: parse, validate, and report every problem with
its field path, the bad value and what is allowed.

``load_model(Model, data, source)`` turns pydantic's errors into one
:class:`errors.ConfigError`; ``parse_yaml`` turns YAML syntax errors into the
same error with the line number.
"""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

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
