"""Pure policy for the series-query guard.

Nothing here does I/O. :func:`plan` looks at one request to a metadata
endpoint (``/api/v1/series``, ``/api/v1/labels``, ``/api/v1/label/<name>/values``)
and answers either :class:`Reject` (with Prometheus's JSON error shape) or
:class:`Forward` (the rewritten query parameters, the result limit and the
deadline). :func:`apply_limit` trims an upstream answer to the limit.

Why: the series API has no built-in bound. ``match[]={le!=""}`` over a large
head walks every histogram bucket series and serialises every label set; one
such call from a dashboard variable can hold a Prometheus CPU for tens of
seconds and its memory for the whole answer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

# --------------------------------------------------------------------------- settings


class GuardPolicy(BaseModel):
    """What the guard allows. Durations are seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deadline: float = Field(10.0, gt=0, le=600, description="hard wall-clock deadline per guarded request")
    max_series: int = Field(10_000, ge=1, le=10_000_000, description="most series /api/v1/series returns")
    max_label_results: int = Field(10_000, ge=1, le=10_000_000, description="most names/values the label endpoints return")
    max_range: float = Field(6 * 3600.0, gt=0, description="widest start..end window allowed")
    default_range: float = Field(3600.0, gt=0, description="window used when the client sends no start")
    on_wide_range: Literal["clamp", "reject"] = "clamp"
    on_limit: Literal["truncate", "reject"] = "truncate"
    reject_unscoped: bool = Field(True, description="reject match[] selectors with no metric name")
    upstream_limit: Literal["auto", "always", "never"] = Field(
        "auto", description="send Prometheus's own `limit` parameter (Prometheus >= 2.51)"
    )
    max_concurrent: int = Field(8, ge=1, le=10_000, description="guarded requests in flight at once")

    @model_validator(mode="after")
    def _ranges(self) -> "GuardPolicy":
        if self.default_range > self.max_range:
            raise ValueError(
                f"default_range ({self.default_range:g}s) must not exceed max_range ({self.max_range:g}s)"
            )
        return self


# --------------------------------------------------------------------------- decisions

GUARDED_PREFIX = "/api/v1/"
_LABEL_VALUES = re.compile(r"^/api/v1/label/([^/]+)/values$")

Endpoint = Literal["series", "labels", "label_values"]

# Prometheus's own errorType -> HTTP status (web/api/v1/api.go respondError).
ERROR_STATUS = {
    "bad_data": 400,
    "execution": 422,
    "canceled": 499,
    "timeout": 503,
    "unavailable": 503,
    "internal": 500,
}


@dataclass(frozen=True)
class Reject:
    error_type: str
    error: str
    reason: str  # short label for metrics: unscoped, bad_request, wide_range, ...

    @property
    def status(self) -> int:
        return ERROR_STATUS.get(self.error_type, 500)

    def body(self) -> dict:
        return {"status": "error", "errorType": self.error_type, "error": self.error}


@dataclass(frozen=True)
class Forward:
    endpoint: Endpoint
    params: list[tuple[str, str]]
    limit: int
    deadline: float
    notes: list[str] = field(default_factory=list)  # what the guard changed, for headers/logs


def classify(path: str) -> Endpoint | None:
    """Which guarded endpoint ``path`` is, or None for pass-through."""
    if path == "/api/v1/series":
        return "series"
    if path == "/api/v1/labels":
        return "labels"
    if _LABEL_VALUES.match(path):
        return "label_values"
    return None


# --------------------------------------------------------------------------- selectors


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str  # = != =~ !~
    value: str


_METRIC = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_OPS = ("=~", "!~", "!=", "=")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "`": "`", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def parse_selector(text: str) -> list[Matcher]:
    """Parse a series selector (``name{a="b", c=~"d"}``) into matchers.

    The metric name, if given, becomes a ``__name__`` equality matcher, as in
    Prometheus. Raises :class:`SelectorError` on anything it does not
    understand; the guard then rejects the request with ``bad_data`` rather
    than forwarding something it cannot judge.
    """
    s = text.strip()
    i = 0
    out: list[Matcher] = []
    m = _METRIC.match(s, i)
    if m:
        out.append(Matcher("__name__", "=", m.group(0)))
        i = m.end()
    i = _skip_ws(s, i)
    if i == len(s):
        if not out:
            raise SelectorError("empty selector")
        return out
    if s[i] != "{":
        raise SelectorError(f"unexpected {s[i]!r} at offset {i}")
    i += 1
    while True:
        i = _skip_ws(s, i)
        if i < len(s) and s[i] == "}":
            i += 1
            break
        lm = _LABEL.match(s, i)
        if not lm:
            raise SelectorError(f"expected a label name at offset {i}")
        name = lm.group(0)
        i = _skip_ws(s, lm.end())
        op = next((o for o in _OPS if s.startswith(o, i)), None)
        if op is None:
            raise SelectorError(f"expected one of = != =~ !~ after {name!r}")
        i = _skip_ws(s, i + len(op))
        value, i = _read_string(s, i)
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise SelectorError(f"bad regex for {name!r}: {exc}") from None
        out.append(Matcher(name, op, value))
        i = _skip_ws(s, i)
        if i < len(s) and s[i] == ",":
            i += 1
            continue
        if i < len(s) and s[i] == "}":
            i += 1
            break
        raise SelectorError(f"expected ',' or '}}' at offset {i}")
    if _skip_ws(s, i) != len(s):
        raise SelectorError(f"trailing text at offset {i}")
    if not out:
        raise SelectorError("selector has no matchers")
    return out


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _read_string(s: str, i: int) -> tuple[str, int]:
    if i >= len(s) or s[i] not in "\"'`":
        raise SelectorError(f"expected a quoted string at offset {i}")
    quote = s[i]
    i += 1
    buf: list[str] = []
    while i < len(s):
        c = s[i]
        if c == quote:
            return "".join(buf), i + 1
        if c == "\\" and quote != "`":
            if i + 1 >= len(s):
                break
            nxt = s[i + 1]
            buf.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        buf.append(c)
        i += 1
    raise SelectorError("unterminated string")


def _matches_empty(m: Matcher) -> bool:
    """Whether a matcher accepts a series that lacks the label (value "")."""
    if m.op == "=":
        return m.value == ""
    if m.op == "!=":
        return m.value != ""
    matched = re.fullmatch(m.value, "") is not None
    return matched if m.op == "=~" else not matched


_LITERAL_START = re.compile(r"[a-zA-Z_:]")


def _regex_is_narrow(regex: str) -> bool:
    """A ``__name__`` regex is narrow when every alternative starts with a literal.

    Prometheus anchors regexes, so ``apiserver_.*`` only matches names that
    start with ``apiserver_``; ``.*``, ``.+`` and ``(?i)...`` are wide.
    """
    body = regex
    while body.startswith("(") and body.endswith(")") and _balanced(body[1:-1]):
        body = body[1:-1]
        if body.startswith("?:"):
            body = body[2:]
    branches = _split_top_level(body)
    return all(b and _LITERAL_START.match(b) for b in branches)


def _balanced(s: str) -> bool:
    depth = 0
    esc = False
    for c in s:
        if esc:
            esc = False
            continue
        if c == "\\":
            esc = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _split_top_level(s: str) -> list[str]:
    out, depth, cur, esc, in_class = [], 0, [], False, False
    for c in s:
        if esc:
            cur.append(c)
            esc = False
            continue
        if c == "\\":
            esc = True
            cur.append(c)
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(c)
    out.append("".join(cur))
    return out


def is_scoped(matchers: Sequence[Matcher]) -> bool:
    """A selector is scoped when it names a metric (or a narrow name regex).

    ``{le!=""}``, ``{__name__=~".*"}`` and ``{job="node"}`` are not: each
    walks the postings of a label shared by a large part of the head.
    """
    for m in matchers:
        if m.name != "__name__":
            continue
        if m.op == "=" and m.value:
            return True
        if m.op == "=~" and not _matches_empty(m) and _regex_is_narrow(m.value):
            return True
    return False


# --------------------------------------------------------------------------- time


class TimeError(ValueError):
    pass


def parse_time(value: str) -> float:
    """Prometheus accepts RFC 3339 or a (fractional) Unix timestamp."""
    v = value.strip()
    try:
        t = float(v)
    except ValueError:
        pass
    else:
        if not math.isfinite(t):
            raise TimeError(f"cannot parse {value!r} to a valid timestamp")
        return t
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise TimeError(f"cannot parse {value!r} to a valid timestamp") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _fmt_time(t: float) -> str:
    return f"{t:.3f}"


# --------------------------------------------------------------------------- plan


def plan(
    path: str,
    params: Sequence[tuple[str, str]],
    now: float,
    policy: GuardPolicy,
    upstream_supports_limit: bool = False,
) -> Forward | Reject | None:
    """Decide what to do with one request. ``None``: not guarded, pass through."""
    endpoint = classify(path)
    if endpoint is None:
        return None
    notes: list[str] = []
    matches = [v for k, v in params if k == "match[]"]
    if endpoint == "series" and not matches:
        return Reject("bad_data", "no match[] parameter provided", "bad_request")
    for sel in matches:
        try:
            matchers = parse_selector(sel)
        except SelectorError as exc:
            return Reject("bad_data", f"invalid match[] {sel!r}: {exc}", "bad_request")
        if policy.reject_unscoped and not is_scoped(matchers):
            return Reject(
                "bad_data",
                f"match[] {sel!r} selects series of every metric; name a metric "
                f"(e.g. my_metric{{...}} or {{__name__=~\"prefix_.*\"}}) — refused by the series-query guard",
                "unscoped",
            )

    single = {k: v for k, v in params if k in ("start", "end", "limit")}
    try:
        end = parse_time(single["end"]) if "end" in single else now
        start = parse_time(single["start"]) if "start" in single else end - policy.default_range
    except TimeError as exc:
        return Reject("bad_data", f"invalid time range: {exc}", "bad_request")
    if end < start:
        return Reject("bad_data", "end timestamp must not be before start time", "bad_request")
    if "start" not in single:
        notes.append(f"start defaulted to end-{policy.default_range:g}s")
    if end - start > policy.max_range:
        if policy.on_wide_range == "reject":
            return Reject(
                "bad_data",
                f"time range {end - start:g}s exceeds the guard's maximum of {policy.max_range:g}s",
                "wide_range",
            )
        start = end - policy.max_range
        notes.append(f"start clamped to end-{policy.max_range:g}s")

    cap = policy.max_series if endpoint == "series" else policy.max_label_results
    limit = cap
    if "limit" in single:
        try:
            asked = int(single["limit"])
        except ValueError:
            return Reject("bad_data", f"invalid limit {single['limit']!r}", "bad_request")
        if asked < 0:
            return Reject("bad_data", "limit must not be negative", "bad_request")
        if asked > 0:  # Prometheus: 0 means no limit
            limit = min(asked, cap)
        if asked == 0 or asked > cap:
            notes.append(f"limit clamped to {cap}")

    out = [(k, v) for k, v in params if k not in ("start", "end", "limit", "timeout")]
    out.append(("start", _fmt_time(start)))
    out.append(("end", _fmt_time(end)))
    send_limit = policy.upstream_limit == "always" or (policy.upstream_limit == "auto" and upstream_supports_limit)
    if send_limit:
        # One more than we return, so we can tell "exactly limit" from "truncated".
        out.append(("limit", str(limit + 1)))
    out.append(("timeout", f"{policy.deadline:g}s"))
    return Forward(endpoint, out, limit, policy.deadline, notes)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Limited:
    body: dict
    truncated: bool
    returned: int
    upstream_count: int


TRUNCATION_WARNING = "results truncated due to limit"


def apply_limit(body: Mapping, limit: int) -> Limited:
    """Trim a successful Prometheus answer to ``limit`` entries, with a warning.

    Matches what Prometheus >= 2.51 does itself when given ``limit``:
    the answer stays ``success`` and gains the warning
    ``results truncated due to limit``.
    """
    data = body.get("data")
    if body.get("status") != "success" or not isinstance(data, list):
        return Limited(dict(body), False, 0, 0)
    n = len(data)
    if n <= limit:
        return Limited(dict(body), False, n, n)
    out = dict(body)
    out["data"] = data[:limit]
    warnings = [w for w in (body.get("warnings") or []) if w != TRUNCATION_WARNING]
    out["warnings"] = warnings + [TRUNCATION_WARNING]
    return Limited(out, True, limit, n)


def limit_exceeded(endpoint: Endpoint, limit: int) -> Reject:
    what = "series" if endpoint == "series" else "results"
    return Reject("execution", f"more than {limit} {what} matched; narrow the selector or time range", "limit")


def deadline_exceeded(deadline: float) -> Reject:
    return Reject(
        "timeout",
        f"series-query guard: upstream did not answer within {deadline:g}s; the upstream request was cancelled",
        "deadline",
    )


_VERSION = re.compile(r"^v?(\d+)\.(\d+)")


def version_supports_limit(version: str) -> bool:
    """Prometheus added ``limit`` to series/labels/label-values in 2.51."""
    m = _VERSION.match(version.strip())
    if not m:
        return False
    major, minor = int(m.group(1)), int(m.group(2))
    return (major, minor) >= (2, 51)
