"""When the relay takes on a request, and how long an agent waits before it asks again.

Pure decisions (no I/O, no clock of their own); the server and the client
apply them.

Relay side: :func:`admit`
    A relay that is behind must refuse early, cheaply and with a time to come
    back, rather than do work for a client that will have given up by the
    time the answer is written (a client that times out retries on a new
    connection, the relay's costliest step, and the backlog grows: the
    overload sustains itself). Two signals say "behind":

    * ``lag``: how late the relay's event loop runs a timer (seconds); every
      request queued ahead of this one adds to it;
    * ``inflight``: requests being answered now (a view waiting on a
      TokenReview counts until its answer is written).

    Over either bound the answer is 503 with ``Retry-After``, sized to the
    backlog so that the retries of a herd arrive slower than the relay
    drains them.

Agent side: :func:`retry_delay`, :func:`relist_delay`
    Exponential backoff with full jitter after a failure; at least the relay's
    ``Retry-After`` (and up to twice it, spread at random) after a 503; and a
    relist after a relay restart spread uniformly over ``relist_spread``
    seconds, so 7,500 agents that lost their relay at the same moment do not
    all relist in the same second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    max_inflight: int = 256  # requests answered at once (views, snapshots, watch set-up)
    max_lag: float = 5.0  # seconds the event loop may run late before new requests are refused (half an
    # agent's 10 s request timeout: below it a queued request is still answered while its client waits)
    min_retry_after: int = 1
    max_retry_after: int = 60


@dataclass(frozen=True, slots=True)
class Admission:
    admit: bool
    retry_after: int = 0  # seconds, for the Retry-After header; 0 when admitted
    cause: str = ""  # "lag" or "inflight" when refused
    reason: str = ""


ADMIT = Admission(True)


def _clamp(v: float, policy: AdmissionPolicy) -> int:
    return max(policy.min_retry_after, min(policy.max_retry_after, int(math.ceil(v))))


def admit(inflight: int, lag: float, policy: AdmissionPolicy) -> Admission:
    """Take on one more request with ``inflight`` already being answered and the loop ``lag`` seconds late?

    Refused when behind: Retry-After is twice the lag (the backlog ahead of a
    request is about ``lag`` seconds of work; asking again after twice that
    lets it drain with room for the requests that are still arriving), or, over
    the in-flight bound, one second per ``max_inflight`` requests in flight."""
    if lag > policy.max_lag:
        return Admission(False, _clamp(2 * lag, policy), "lag",
                         f"the relay is {lag:.1f}s behind (limit {policy.max_lag:g}s)")
    if inflight >= policy.max_inflight:
        return Admission(False, _clamp(inflight / policy.max_inflight, policy), "inflight",
                         f"{inflight} requests in flight (limit {policy.max_inflight})")
    return ADMIT


# --- agent side -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base: float = 0.5  # first delay after a failure, seconds
    cap: float = 30.0  # longest delay after failures
    relist_spread: float = 10.0  # a relist after a relay restart starts within this many seconds
    max_retry_after: float = 300.0  # a Retry-After above this is taken as this
    max_request_timeout: float = 60.0  # longest wait for one answer after repeated timeouts


def retry_delay(attempt: int, u: float, policy: BackoffPolicy, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` failures so far, from 1).

    ``u`` is a uniform random number in [0, 1) (injected: the schedule is a
    pure function). Without ``retry_after``: full jitter over an exponential
    window, ``u * min(cap, base * 2**(attempt-1))``, never below ``base / 2`` so
    a dead relay is not polled in a tight loop. With the relay's Retry-After
    ``r``: between ``r`` and ``2r`` (never earlier than the relay asked, and
    spread so a refused herd does not come back in the same second)."""
    if attempt < 1:
        raise ValueError("attempt counts failures, from 1")
    if retry_after is not None and retry_after > 0:
        r = min(retry_after, policy.max_retry_after)
        return r * (1.0 + u)
    window = min(policy.cap, policy.base * 2 ** min(attempt - 1, 30))
    return max(policy.base / 2, u * window)


def request_timeout(base: float, timeouts: int, policy: BackoffPolicy) -> float:
    """How long to wait for the next answer after ``timeouts`` requests in a row timed out:
    ``base`` doubled per timeout, up to ``max_request_timeout``. A client that times out
    closes its connection and asks again on a new one, the relay's costliest step; a relay
    that is that far behind is better waited for than asked again."""
    return min(max(base, policy.max_request_timeout), base * 2 ** min(max(timeouts, 0), 30))


def relist_delay(after_restart: bool, u: float, policy: BackoffPolicy) -> float:
    """Seconds to wait before relisting after a 410. After the relay restarted
    (the watch broke on a lost connection, then the resume was refused: another
    relay epoch), every agent of the fleet is relisting at once: spread over
    ``relist_spread``. Otherwise (a trimmed history, a dropped slow watch) it is
    this agent alone: relist at once."""
    return u * policy.relist_spread if after_restart else 0.0


# --- file descriptors -------------------------------------------------------------------------
FD_HEADROOM = 1024  # informers, metrics, logs, TokenReviews, and slack


@dataclass(frozen=True, slots=True)
class OpenFiles:
    soft: int  # the soft RLIMIT_NOFILE to set
    needed: int  # what ``expected_agents`` need (0 when not given)
    level: str  # "info", "warning" (enough for steady state, not for a fleet reconnecting) or "error"
    message: str


def open_files_plan(soft: int, hard: int, expected_agents: int, *, infinity: int = -1) -> OpenFiles:
    """Raise the soft open-file limit to the hard one, and judge it against the agents expected.

    Each agent holds one connection (its view and its watch share it); while a
    fleet reconnects (a relay restart, a herd refused with 503) the old
    connection can linger in CLOSE_WAIT beside the new one, so a relay needs
    ``2 * agents + FD_HEADROOM`` to ride out a reconnect and
    ``agents + FD_HEADROOM`` to serve the fleet at all."""
    needed = 2 * expected_agents + FD_HEADROOM if expected_agents else 0
    if hard == infinity:
        new = max(soft, needed, 65_536)
    else:
        new = max(soft, hard)
    if not expected_agents:
        return OpenFiles(new, 0, "info", f"open-file limit {new} (hard {'unlimited' if hard == infinity else hard})")
    if new < expected_agents + FD_HEADROOM:
        return OpenFiles(new, needed, "error",
                         f"open-file limit {new} cannot hold {expected_agents} agents (needs {needed}: one connection "
                         f"per agent, two while the fleet reconnects, plus {FD_HEADROOM}); raise the hard limit "
                         f"(the container runtime's LimitNOFILE) or run more relay replicas")
    if new < needed:
        return OpenFiles(new, needed, "warning",
                         f"open-file limit {new} holds {expected_agents} agents but not a fleet-wide reconnect "
                         f"(needs {needed}); raise the hard limit or run more relay replicas")
    return OpenFiles(new, needed, "info", f"open-file limit {new} (needs {needed} for {expected_agents} agents)")
