"""One error tree for fleetkeeper.

    FleetkeeperError
    ├── ConfigError               bad user input: a flag, a ConfigMap, a policy file
    │                             (carries the field path, the bad value, what is allowed)
    ├── ClusterError              the local control plane (binaries, ports, processes)
    ├── Temporary(delay)          try again later; a work queue requeues after ``delay``
    ├── Terminal                  retrying will not help; logged, counted, not requeued
    └── ApiError(status, reason)  an HTTP error answered by the Kubernetes API server
        ├── BadRequest            400
        ├── Unauthorized          401
        ├── Forbidden             403
        ├── NotFound              404
        ├── Conflict              409 (AlreadyExists is a Conflict with reason AlreadyExists)
        ├── Gone                  410 (a watch or list resourceVersion too old)
        ├── Invalid               422
        ├── TooManyRequests       429 (API Priority and Fairness, or a PDB blocking an eviction)
        └── ServerError           5xx
    ApiUnreachable                the API server could not be reached at all (subclass of
                                  Temporary)
    MachineError(provider, machine)  a machine provider's API answered an error
    ├── MachineNotFound           the machine does not exist (for terminate: already gone)
    ├── MachineThrottled          the provider rate-limited us (a Temporary: retry later)
    ├── MachineForbidden          our identity lacks a permission (a Temporary with a long delay:
    │                             retried after someone grants it)
    ├── MachineUnsupported        the provider has no such action for this machine (Terminal)
    └── MachineFailed             any other failure (a Temporary)

Callers catch categories: ``except NotFound``, ``except Temporary``,
``except ApiError``; :func:`is_retryable` tells the retry policy which ones are
worth retrying.
"""

from __future__ import annotations

from typing import Any


class FleetkeeperError(Exception):
    """Base of every error fleetkeeper raises on purpose."""


class ConfigError(FleetkeeperError):
    """User-facing configuration is wrong.

    ``problems`` is a list of ``(path, value, message)`` so the whole set of
    problems can be reported at once.
    """

    def __init__(self, source: str, problems: list[tuple[str, Any, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"]
        for path, value, message in problems:
            lines.append(f"  {path or '<root>'}: {message} (got {value!r})")
        super().__init__("\n".join(lines))

    @property
    def summary(self) -> str:
        path, value, message = self.problems[0]
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.source}: {path or '<root>'}: {message} (got {value!r}){more}"


class ClusterError(FleetkeeperError):
    """The local control plane cannot be built, started or reached."""


class Temporary(FleetkeeperError):
    """Try again after ``delay`` seconds."""

    def __init__(self, message: str, delay: float = 1.0):
        super().__init__(message)
        self.delay = delay


class Terminal(FleetkeeperError):
    """Retrying will not help."""


class ApiUnreachable(Temporary):
    """The Kubernetes API server did not answer (connection refused, timeout)."""


class ApiError(FleetkeeperError):
    status: int = 0

    def __init__(self, status: int, reason: str = "", message: str = "", body: dict | None = None):
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}
        super().__init__(f"{status} {reason}: {message}".strip())


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class Gone(ApiError):
    pass


class Invalid(ApiError):
    pass


class TooManyRequests(ApiError):
    @property
    def retry_after(self) -> float:
        details = self.body.get("details") or {}
        return float(details.get("retryAfterSeconds") or 1)


class ServerError(ApiError):
    pass


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Invalid,
    429: TooManyRequests,
}


def api_error(status: int, body: dict | None = None) -> ApiError:
    """Map an HTTP status and a Kubernetes ``Status`` body to the error tree."""
    body = body or {}
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, str(body.get("reason", "")), str(body.get("message", "")), body)


class MachineError(FleetkeeperError):
    """A machine provider (cloud API, Cluster API, Karpenter, an operator command) failed."""

    def __init__(self, provider: str, machine: str, message: str):
        self.provider = provider
        self.machine = machine
        super().__init__(f"{provider}: {machine}: {message}")


class MachineNotFound(MachineError):
    pass


class MachineThrottled(MachineError, Temporary):
    def __init__(self, provider: str, machine: str, message: str, delay: float = 30.0):
        MachineError.__init__(self, provider, machine, message)
        self.delay = delay


class MachineForbidden(MachineError, Temporary):
    def __init__(self, provider: str, machine: str, message: str, delay: float = 300.0):
        MachineError.__init__(self, provider, machine, message)
        self.delay = delay


class MachineFailed(MachineError, Temporary):
    def __init__(self, provider: str, machine: str, message: str, delay: float = 60.0):
        MachineError.__init__(self, provider, machine, message)
        self.delay = delay


class MachineUnsupported(MachineError, Terminal):
    pass


def is_retryable(err: BaseException) -> bool:
    return isinstance(err, (Temporary, TooManyRequests, ServerError, Conflict))
