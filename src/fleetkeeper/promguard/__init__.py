"""Series-query guard: a deadline and a result limit for Prometheus's metadata APIs.

``policy`` holds the pure decisions, ``proxy`` the aiohttp reverse proxy,
``cli`` the ``fleetkeeper promguard`` commands.
"""

from .policy import Forward, GuardPolicy, Reject, apply_limit, is_scoped, parse_selector, plan
from .proxy import Guard, ProxySettings, load_settings

__all__ = [
    "Forward", "Guard", "GuardPolicy", "ProxySettings", "Reject", "apply_limit", "is_scoped",
    "load_settings", "parse_selector", "plan",
]
