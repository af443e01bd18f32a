"""Writes docs/configuration.md: every key of every configuration fleetkeeper reads,
with its type, default and description, from the pydantic models themselves.

    .venv/bin/python hack/gen_config_reference.py          # rewrite the file
    .venv/bin/python hack/gen_config_reference.py --check  # exit 1 when it is stale (tests do this)
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"


def sections():
    from fleetkeeper.capacity.config import CapacityConfig
    from fleetkeeper.core.settings import RuntimeSettings
    from fleetkeeper.health.policy import Policy
    from fleetkeeper.netacct.settings import NetacctSettings
    from fleetkeeper.preflight.config import PreflightConfig
    from fleetkeeper.relay.settings import RelayConfig
    from fleetkeeper.teams.config import TeamsConfig
    from fleetkeeper.teams.options import TeamsOptions

    return [
        ("preflight", "ConfigMap `fleetkeeper-preflight`, key `config.yaml` (chart value `preflight.config`)",
         PreflightConfig),
        ("health", "ConfigMap `fleetkeeper-health`, key `policy.yaml` (chart value `health.policy`)", Policy),
        ("teams", "ConfigMap `fleetkeeper-teams`, key `config.yaml` (chart value `teams.config`)", TeamsConfig),
        ("teams options", "ConfigMap `fleetkeeper-teams`, key `options.yaml` (the chart writes it from "
                          "`teams.webhook`)", TeamsOptions),
        ("capacity", "ConfigMap `fleetkeeper-capacity`, key `config.yaml` (chart value `capacity.config`)",
         CapacityConfig),
        ("relay", "ConfigMap `fleetkeeper-relay`, key `config.yaml` (chart value `relay.config`)", RelayConfig),
        ("netacct", "`fleetkeeper netacct run --config FILE` (flags override)", NetacctSettings),
        ("runtime", "`fleetkeeper run` flags (every controller)", RuntimeSettings),
    ]


def _type(t) -> str:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(t))
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(t))
    if origin in (list, tuple, set):
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        k, v = typing.get_args(t) or (str, str)
        return f"map {_type(k)} → {_type(v)}"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return t.__name__
    if t is type(None):
        return "null"
    return getattr(t, "__name__", str(t))


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(see below)"

    def plain(v):
        return v.model_dump(mode="json", by_alias=True) if isinstance(v, BaseModel) else str(v)
    try:
        text = json.dumps(value, default=plain)
    except TypeError:
        text = str(value)
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def _nested(t) -> list[type[BaseModel]]:
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [t]
    out = []
    for a in typing.get_args(t):
        out += _nested(a)
    return out


def rows(model: type[BaseModel], prefix: str = "", seen: set | None = None) -> list[str]:
    seen = seen if seen is not None else set()
    out = []
    for name, f in model.model_fields.items():
        key = prefix + (f.alias or name)
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        out.append(f"| `{key}` | {_type(f.annotation)} | {_default(f)} | {desc} |")
        for sub in _nested(f.annotation):
            if sub in seen:
                continue
            seen.add(sub)
            is_list = typing.get_origin(f.annotation) in (list, tuple) or \
                any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(f.annotation))
            out += rows(sub, f"{key}[]." if is_list else f"{key}.", seen)
            seen.discard(sub)
    return out


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the pydantic models by `hack/gen_config_reference.py`; do not edit by hand "
             "(`tests/unit/test_config_reference.py` fails when it is stale). Unknown keys are errors "
             "everywhere, and a bad value is reported with its path; a component keeps its last good "
             "configuration when a ConfigMap becomes invalid.", ""]
    for title, where, model in sections():
        lines += [f"## {title}", "", where + ".", "", "| key | type | default | description |",
                  "|---|---|---|---|", *rows(model), ""]
    return "\n".join(lines)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run .venv/bin/python hack/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
