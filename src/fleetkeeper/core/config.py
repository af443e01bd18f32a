"""User-facing configuration: parse, validate, and report every problem with
its field path, the bad value and what is allowed.

``load_model(Model, data, source)`` turns pydantic's errors into one
:class:`errors.ConfigError`; ``parse_yaml`` is the one YAML parser for every
ConfigMap, policy and settings file: it refuses, before anything is expanded,

* documents larger than ``max_bytes`` (default 1 MiB, the size limit of a
  ConfigMap), checked on the raw text before the parser starts;
* anchors and aliases (``&a`` / ``*a``): a 485-byte "billion laughs" document
  of nested aliases expands into tens of megabytes; the node graph is refused
  at the first anchor, while composing, so nothing is ever expanded;
* duplicate mapping keys (YAML says they are an error; PyYAML silently keeps
  the last one, so a typo could switch a setting without a word);
* nesting deeper than ``max_depth`` (a deep ``[[[[...]]]]`` would otherwise end
  in a RecursionError);
* tags other than the standard ones the safe loader knows;

each with a :class:`errors.ConfigError` naming the line, column and what is
wrong, and YAML syntax errors the same way.
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


MAX_YAML_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 64


class _Refused(yaml.YAMLError):
    def __init__(self, mark: Any, problem: str):
        super().__init__(problem)
        self.problem_mark, self.problem = mark, problem


def _safe_loader(max_depth: int) -> type:
    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses anchors, aliases, duplicate keys and deep nesting
        while composing the node graph (before any construction or expansion)."""

        _depth = 0

        def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
            ev = self.peek_event()
            if isinstance(ev, yaml.AliasEvent):
                raise _Refused(ev.start_mark, f"YAML alias *{ev.anchor} is not allowed in fleetkeeper "
                                              "configuration (aliases and anchors are refused: they can expand "
                                              "a small document into gigabytes); write the value out")
            if getattr(ev, "anchor", None) is not None:
                raise _Refused(ev.start_mark, f"YAML anchor &{ev.anchor} is not allowed in fleetkeeper "
                                              "configuration (aliases and anchors are refused: they can expand "
                                              "a small document into gigabytes); write the value out")
            self._depth += 1
            try:
                if self._depth > max_depth:
                    raise _Refused(ev.start_mark, f"nested more than {max_depth} levels deep")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        raise _Refused(key_node.start_mark, "YAML merge keys (<<) are not allowed")
                    if isinstance(key_node, yaml.ScalarNode):
                        key = self.construct_object(key_node, deep=True)
                        try:
                            hash(key)
                        except TypeError:
                            continue  # the base class reports unhashable keys
                        if key in seen:
                            raise _Refused(key_node.start_mark,
                                           f"duplicate key {key!r} (first at line {seen[key].line + 1}); "
                                           "each key may appear once")
                        seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return Loader


_LOADERS: dict[int, type] = {}


def parse_yaml(text: str | bytes, source: str, *, max_bytes: int = MAX_YAML_BYTES,
               max_depth: int = MAX_YAML_DEPTH) -> Any:
    """The one YAML parser for fleetkeeper configuration (see the module doc)."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > max_bytes:
        raise ConfigError(source, [("", f"{size} bytes", f"document too large: at most {max_bytes} bytes "
                                                         "of YAML are read")])
    loader = _LOADERS.get(max_depth) or _LOADERS.setdefault(max_depth, _safe_loader(max_depth))
    try:
        docs = yaml.load_all(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
        first = next(docs, None)
        if next(docs, None) is not None:
            raise _Refused(None, "more than one YAML document (---); put everything in one")
        return first
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        excerpt = text[:80] if isinstance(text, str) else text[:80].decode(errors="replace")
        raise ConfigError(source, [(where, excerpt, f"not valid YAML: {getattr(exc, 'problem', None) or exc}")]) from None


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
