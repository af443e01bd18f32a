"""Settings of the netacct node agent, and the egress rate syntax.

Rates use tc's units: ``bit kbit mbit gbit tbit`` (bits per second) and
``bps kbps mbps gbps`` (BYTES per second, as in tc). Multipliers are powers of
1000, as in tc. A bare number is rejected: ``100`` could mean bits or bytes.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleetkeeper.core.config import parse_yaml
from fleetkeeper.core.domain import DEFAULT_DOMAIN
from fleetkeeper.core.errors import ConfigError

MIN_RATE_BPS = 8_000            # 8kbit: below this HTB cannot shape meaningfully
MAX_RATE_BPS = 400_000_000_000  # 400gbit

_UNITS = {
    "bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000, "tbit": 1_000_000_000_000,
    "bps": 8, "kbps": 8_000, "mbps": 8_000_000, "gbps": 8_000_000_000, "tbps": 8_000_000_000_000,
}
_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*$")
RATE_HELP = ("a rate such as 100mbit, 1.5gbit or 500kbit (units: bit kbit mbit gbit tbit; "
             f"bps kbps mbps gbps are BYTES per second), between {MIN_RATE_BPS} bit/s and 400gbit")


class RateError(ValueError):
    pass


def parse_rate(text: Any) -> int:
    """Parse a tc-style rate to bits per second; :class:`RateError` says what is wrong."""
    if not isinstance(text, str):
        raise RateError(f"expected {RATE_HELP}")
    m = _RATE_RE.match(text)
    if not m:
        raise RateError(f"not a rate: expected {RATE_HELP}")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise RateError(f"unknown unit {m.group(2)!r}: expected {RATE_HELP}")
    bps = int(round(float(m.group(1)) * _UNITS[unit]))
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise RateError(f"{text.strip()} is out of range: expected {RATE_HELP}")
    return bps


def format_rate(bps: int) -> str:
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % mult == 0:
            return f"{bps // mult}{unit}"
    return f"{bps}bit"


_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


class NetacctSettings(BaseModel):
    """Everything the node agent needs. Unknown keys are errors (typos must not pass)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str = Field(min_length=1, max_length=253, description="This node's name")
    domain: str = DEFAULT_DOMAIN
    internal_ranges: tuple[ipaddress.IPv4Network, ...] = (ipaddress.IPv4Network("10.0.0.0/8"),)
    backend: Literal["auto", "nft", "legacy"] = "auto"
    interval_s: float = Field(15.0, gt=0, le=3600)
    # pod source: exactly one of these
    pods_file: Path | None = None
    relay_url: str | None = None
    relay_timeout_s: float = Field(5.0, gt=0, le=120)
    # exporter
    pod_series: bool = True
    max_pod_series: int = Field(2000, ge=0, le=100_000)
    # shaping
    uplink: str | None = None
    team_limits: dict[str, str] = Field(default_factory=dict,
                                        description="team -> per-pod internet egress limit")
    namespace_limits: dict[str, str] = Field(default_factory=dict,
                                             description="namespace -> limit shared by its pods on this node")

    @field_validator("internal_ranges", mode="before")
    @classmethod
    def _ranges(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s for s in v.split(",") if s.strip()]
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("at least one internal range is required")
            out = []
            for item in v:
                try:
                    out.append(ipaddress.IPv4Network(str(item).strip(), strict=True))
                except ValueError as exc:
                    raise ValueError(f"{item!r} is not an IPv4 network in CIDR form with no host bits set "
                                     f"(e.g. 10.0.0.0/8): {exc}") from None
            return tuple(out)
        return v

    @field_validator("uplink")
    @classmethod
    def _uplink(cls, v: str | None) -> str | None:
        if v is not None and not _IFNAME_RE.match(v):
            raise ValueError("must be a network interface name: 1-15 characters of letters, digits, _ . : @ -")
        return v

    @field_validator("team_limits", "namespace_limits")
    @classmethod
    def _limits(cls, v: dict[str, str]) -> dict[str, str]:
        bad = []
        for key, rate in v.items():
            try:
                parse_rate(rate)
            except RateError as exc:
                bad.append(f"{key}: {exc} (got {rate!r})")
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "NetacctSettings":
        if self.pods_file is not None and self.relay_url is not None:
            raise ValueError("set either pods_file or relay_url, not both")
        if self.relay_url is not None and not re.match(r"^https?://", self.relay_url):
            raise ValueError("relay_url must start with http:// or https://")
        return self

    @property
    def max_buckets(self) -> int:
        """Shaping buckets are HTB classes fee7:1 .. fee7:fff."""
        return 0xFFF


def _problems(exc: ValidationError) -> list[tuple[str, Any, str]]:
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        out.append((path, err.get("input"), msg))
    return out


def make_settings(source: str, data: dict[str, Any]) -> NetacctSettings:
    try:
        return NetacctSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None


def load_settings(path: Path | None, overrides: dict[str, Any] | None = None) -> NetacctSettings:
    """Read a YAML settings file (optional) and apply overrides (flags) on top."""
    data: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        try:
            loaded = parse_yaml(path.read_text(), source)
        except FileNotFoundError:
            raise ConfigError(source, [("", str(path), "settings file does not exist")]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(source, [("", type(loaded).__name__, "settings must be a mapping")])
        data.update(loaded)
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k] = v
    return make_settings(source, data)
