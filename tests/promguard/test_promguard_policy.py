"""Pure policy: selectors, scoping, time ranges, limits."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetkeeper.promguard import policy as P

NOW = 1_800_000_000.0


def fwd(path: str, params, **pol) -> P.Forward:
    d = P.plan(path, params, NOW, P.GuardPolicy(**pol))
    assert isinstance(d, P.Forward), d
    return d


def rej(path: str, params, **pol) -> P.Reject:
    d = P.plan(path, params, NOW, P.GuardPolicy(**pol))
    assert isinstance(d, P.Reject), d
    return d


def param(d: P.Forward, key: str) -> list[str]:
    return [v for k, v in d.params if k == key]


# ---------------------------------------------------------------- selectors


@pytest.mark.parametrize(
    "sel, expected",
    [
        ("up", [P.Matcher("__name__", "=", "up")]),
        ('up{job="node"}', [P.Matcher("__name__", "=", "up"), P.Matcher("job", "=", "node")]),
        ('{le!=""}', [P.Matcher("le", "!=", "")]),
        ("{__name__=~'apiserver_.*', code=~`5..`}",
         [P.Matcher("__name__", "=~", "apiserver_.*"), P.Matcher("code", "=~", "5..")]),
        ('x:y_z{ a = "q\\"uote" , }', [P.Matcher("__name__", "=", "x:y_z"), P.Matcher("a", "=", 'q"uote')]),
        ('m{a!~"b|c"}', [P.Matcher("__name__", "=", "m"), P.Matcher("a", "!~", "b|c")]),
    ],
)
def test_parse_selector(sel, expected):
    assert P.parse_selector(sel) == expected


@pytest.mark.parametrize(
    "bad", ["", "{}", '{le!=""', 'up{job=node}', 'up{job="x"} extra', '{a=~"("}', "1abc", 'up{"a"="b"}', 'up{a="x}'],
)
def test_parse_selector_rejects_garbage(bad):
    with pytest.raises(P.SelectorError):
        P.parse_selector(bad)


@pytest.mark.parametrize(
    "sel, scoped",
    [
        ("up", True),
        ('apiserver_request_total{code="429"}', True),
        ('{__name__="up"}', True),
        ('{__name__=~"apiserver_.*"}', True),
        ('{__name__=~"(etcd_.*|apiserver_.*)"}', True),
        ('{__name__=~"etcd_.*|apiserver_.*"}', True),
        ('{le!=""}', False),
        ('{__name__=~".*"}', False),
        ('{__name__=~".+"}', False),
        ('{__name__=~".+", le!=""}', False),
        ('{__name__=~"(?i)up"}', False),
        ('{__name__=~"up|.*"}', False),
        ('{__name__!="up"}', False),
        ('{__name__=""}', False),
        ('{job="node"}', False),
        ('{__name__=~"(up)?"}', False),  # matches the empty name
    ],
)
def test_scoping(sel, scoped):
    assert P.is_scoped(P.parse_selector(sel)) is scoped


_names = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(name=_names, labels=st.lists(st.tuples(_names, st.sampled_from(["=", "!="]), _values), max_size=4))
def test_parse_roundtrip(name, labels):
    def q(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    text = name + "{" + ",".join(f"{l}{op}{q(v)}" for l, op, v in labels) + "}"
    got = P.parse_selector(text)
    assert got[0] == P.Matcher("__name__", "=", name)
    assert got[1:] == [P.Matcher(l, op, v) for l, op, v in labels]
    assert P.is_scoped(got)


# ---------------------------------------------------------------- plan


def test_passthrough_paths_are_not_guarded():
    pol = P.GuardPolicy()
    for path in ("/api/v1/query", "/api/v1/query_range", "/metrics", "/api/v1/targets", "/api/v1/series/x"):
        assert P.plan(path, [("match[]", '{le!=""}')], NOW, pol) is None


def test_the_article_query_is_refused():
    r = rej("/api/v1/series", [("match[]", '{le!=""}')])
    assert (r.status, r.error_type, r.reason) == (400, "bad_data", "unscoped")
    assert r.body()["status"] == "error"


def test_every_match_must_be_scoped():
    r = rej("/api/v1/labels", [("match[]", "up"), ("match[]", '{__name__=~".*"}')])
    assert r.reason == "unscoped"


def test_unscoped_allowed_when_configured_but_still_bounded():
    d = fwd("/api/v1/series", [("match[]", '{le!=""}')], reject_unscoped=False, deadline=2.5, max_series=50)
    assert d.limit == 50
    assert d.deadline == 2.5
    assert param(d, "timeout") == ["2.5s"]


def test_series_needs_match():
    assert rej("/api/v1/series", []).error == "no match[] parameter provided"


def test_labels_without_match_is_allowed():
    d = fwd("/api/v1/labels", [])
    assert d.endpoint == "labels"
    assert d.limit == 10_000


def test_label_values_endpoint():
    d = fwd("/api/v1/label/node/values", [("match[]", "kube_node_info")], max_label_results=7)
    assert (d.endpoint, d.limit) == ("label_values", 7)


def test_missing_start_defaults_to_default_range():
    d = fwd("/api/v1/series", [("match[]", "up")], default_range=600)
    assert float(param(d, "end")[0]) == NOW
    assert float(param(d, "start")[0]) == NOW - 600
    assert any("defaulted" in n for n in d.notes)


def test_wide_range_is_clamped():
    d = fwd("/api/v1/series", [("match[]", "up"), ("start", "0"), ("end", str(NOW))], max_range=3600)
    assert float(param(d, "start")[0]) == NOW - 3600
    assert any("clamped" in n for n in d.notes)


def test_wide_range_rejected_when_configured():
    r = rej("/api/v1/series", [("match[]", "up"), ("start", "0")], max_range=3600, on_wide_range="reject")
    assert r.reason == "wide_range"


def test_rfc3339_times():
    d = fwd("/api/v1/series", [("match[]", "up"), ("start", "2027-01-15T00:00:00Z"), ("end", "2027-01-15T01:00:00.5Z")])
    start = datetime(2027, 1, 15, tzinfo=timezone.utc).timestamp()
    assert float(param(d, "start")[0]) == start
    assert float(param(d, "end")[0]) == pytest.approx(start + 3600.5)


@pytest.mark.parametrize("params", [
    [("start", "yesterday")],
    [("end", "nan")],
    [("start", "100"), ("end", "50")],
    [("limit", "lots")],
    [("limit", "-1")],
    [("match[]", 'up{a=~"("}')],
])
def test_bad_requests(params):
    r = rej("/api/v1/series", [("match[]", "up"), *params])
    assert (r.status, r.reason) == (400, "bad_request")


@pytest.mark.parametrize("asked, cap, expect, noted", [(None, 100, 100, False), ("10", 100, 10, False),
                                                        ("1000", 100, 100, True), ("0", 100, 100, True)])
def test_limit_clamp(asked, cap, expect, noted):
    params = [("match[]", "up")] + ([("limit", asked)] if asked else [])
    d = fwd("/api/v1/series", params, max_series=cap)
    assert d.limit == expect
    assert any("limit clamped" in n for n in d.notes) is noted


def test_client_timeout_and_range_are_replaced_not_duplicated():
    d = fwd("/api/v1/series", [("match[]", "up"), ("timeout", "5m"), ("start", "1"), ("end", "2"), ("limit", "3")])
    for key in ("start", "end", "timeout"):
        assert len(param(d, key)) == 1
    assert param(d, "limit") == []  # upstream does not take it


def test_upstream_limit_sent_when_supported():
    d = P.plan("/api/v1/series", [("match[]", "up"), ("limit", "5")], NOW, P.GuardPolicy(), upstream_supports_limit=True)
    assert isinstance(d, P.Forward)
    assert param(d, "limit") == ["6"]  # one extra, to detect truncation
    d = P.plan("/api/v1/series", [("match[]", "up")], NOW, P.GuardPolicy(upstream_limit="never"), upstream_supports_limit=True)
    assert param(d, "limit") == []


@pytest.mark.parametrize("version, ok", [("2.42.0+ds", False), ("2.50.1", False), ("2.51.0", True),
                                         ("v2.53.1", True), ("3.0.0", True), ("garbage", False)])
def test_version_supports_limit(version, ok):
    assert P.version_supports_limit(version) is ok


# ---------------------------------------------------------------- results


def test_apply_limit_truncates_with_prometheus_warning():
    body = {"status": "success", "data": [{"__name__": f"m{i}"} for i in range(10)], "warnings": ["other"]}
    out = P.apply_limit(body, 3)
    assert out.truncated and out.returned == 3 and out.upstream_count == 10
    assert out.body["data"] == body["data"][:3]
    assert out.body["warnings"] == ["other", P.TRUNCATION_WARNING]
    assert len(body["data"]) == 10  # input untouched


def test_apply_limit_within_limit_is_identity():
    body = {"status": "success", "data": ["a", "b"]}
    out = P.apply_limit(body, 2)
    assert not out.truncated and out.body == body


def test_apply_limit_leaves_errors_alone():
    body = {"status": "error", "errorType": "bad_data", "error": "x"}
    assert P.apply_limit(body, 1).body == body


@given(n=st.integers(0, 200), limit=st.integers(1, 100))
def test_apply_limit_property(n, limit):
    out = P.apply_limit({"status": "success", "data": list(range(n))}, limit)
    assert len(out.body["data"]) == min(n, limit)
    assert out.truncated == (n > limit)
    assert (P.TRUNCATION_WARNING in out.body.get("warnings", [])) == (n > limit)


def test_error_statuses_follow_prometheus():
    assert P.deadline_exceeded(1.0).status == 503
    assert P.deadline_exceeded(1.0).error_type == "timeout"
    assert P.limit_exceeded("series", 5).status == 422


def test_policy_validation():
    with pytest.raises(ValidationError) as e:
        P.GuardPolicy(default_range=7200, max_range=3600)
    assert "default_range" in str(e.value)
    with pytest.raises(ValidationError):
        P.GuardPolicy(deadline=0)
    with pytest.raises(ValidationError):
        P.GuardPolicy(on_limit="drop")
    with pytest.raises(ValidationError):
        P.GuardPolicy(bogus=1)
