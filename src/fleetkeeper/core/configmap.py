"""The one ConfigMap loader: every component's configuration key behaves the same.

* the ConfigMap does not exist: the defaults (``parse(None)``), logged once;
* the ConfigMap exists without the key: a :class:`ConfigError` naming the key
  and the keys that are there (a mistyped key must not silently mean
  "defaults");
* the text is invalid: a :class:`ConfigError` with the field path. At start
  that stops the process with that message; on a reload the **last good**
  configuration stays in force and the error is logged once per distinct
  message;
* the API server cannot be reached on a reload: the last good stays.

Components that poll call :meth:`ConfigMapKey.load` at start and
:meth:`ConfigMapKey.reload` on a timer; a component that watches its
ConfigMap (an informer hands it every version) calls :meth:`ConfigMapKey.offer`
with each one, which applies the same rules. What "absent" means is the
component's ``parse(None)``: its defaults, or (teams: no ConfigMap is no
configuration) a :class:`ConfigError` saying so, which then behaves like any
invalid version.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from fleetkeeper.core import errors
from fleetkeeper.core.kube import CONFIGMAPS, Kube

log = logging.getLogger("fleetkeeper.config")

T = TypeVar("T")


class ConfigMapKey(Generic[T]):
    def __init__(self, kube: Kube, namespace: str, name: str, key: str,
                 parse: Callable[[str | None, str], T]):
        self.kube, self.namespace, self.name, self.key = kube, namespace, name, key
        self.parse = parse
        self.last_good: T | None = None
        self.data: dict[str, str] = {}  # the ConfigMap's other keys, as last read
        self.error: errors.ConfigError | None = None  # why the last version offered or reloaded was rejected
        self._last_error = ""

    @property
    def source(self) -> str:
        return f"configmap {self.namespace}/{self.name} key {self.key}"

    def parse_data(self, cm: dict | None) -> T:
        """Pure: the configuration a ConfigMap object (or None: absent) stands for; raises ConfigError."""
        if cm is None:
            return self.parse(None, self.source)
        data = cm.get("data") or {}
        if self.key not in data:
            raise errors.ConfigError(self.source, [(f"data.{self.key}", sorted(data), f"missing key {self.key!r}")])
        return self.parse(data[self.key], self.source)

    async def load(self) -> T:
        """At start: raises ConfigError (bad configuration) or an API error (unreachable)."""
        cm = await self.kube.get_or_none(CONFIGMAPS, self.name, self.namespace)
        if cm is None:
            log.info("%s: no such ConfigMap; using the defaults", self.source)
        value = self.parse_data(cm)
        self.data = dict((cm or {}).get("data") or {})
        self.last_good = value
        return value

    async def reload(self) -> T | None:
        """The new configuration when it changed, else None (unchanged, invalid or unreadable: the last good
        one stays in force)."""
        try:
            cm = await self.kube.get_or_none(CONFIGMAPS, self.name, self.namespace)
            value = self.parse_data(cm)
        except errors.ConfigError as exc:
            self._rejected(exc, absent=cm is None)
            return None
        except errors.FleetkeeperError as exc:
            log.warning("could not read %s (%s); keeping the previous configuration", self.source, exc)
            return None
        return self._accepted(cm, value)

    def offer(self, cm: dict | None) -> T | None:
        """One version of the ConfigMap as a watch delivered it (None: deleted or absent): the new
        configuration when it changed, else None (unchanged; or invalid: :attr:`error` says why and the last
        good one stays in force). Pure but for this object's memory."""
        try:
            value = self.parse_data(cm)
        except errors.ConfigError as exc:
            self._rejected(exc, absent=cm is None)
            return None
        return self._accepted(cm, value)

    def _rejected(self, exc: errors.ConfigError, *, absent: bool = False) -> None:
        self.error = exc
        if str(exc) != self._last_error:
            if absent and self.last_good is None:  # a fresh install before its configuration: not an error yet
                log.warning("not configured yet (waiting for the ConfigMap): %s", exc)
            else:
                kept = "keeping the previous one" if self.last_good is not None else "nothing is configured yet"
                log.error("configuration rejected, %s: %s", kept, exc)
            self._last_error = str(exc)

    def _accepted(self, cm: dict | None, value: T) -> T | None:
        self._last_error = ""
        self.error = None
        self.data = dict((cm or {}).get("data") or {})
        if value == self.last_good:
            return None
        self.last_good = value
        return value


async def watch_at_start_only(src: ConfigMapKey[T], sleep: Callable[[float], Awaitable[None]],
                              interval: float = 30.0) -> None:
    """For a component that applies its configuration at start only (relay, capacity): read the ConfigMap
    again every ``interval`` seconds, so that a bad version is reported at once (the loader's rule: the
    error, naming what is wrong, is logged and the configuration running stays) and a good new one is
    reported as waiting for the next start."""
    while True:
        await sleep(interval)
        new = await src.reload()
        if new is not None:
            log.warning("%s changed; the running configuration stays in force until the next start", src.source)
