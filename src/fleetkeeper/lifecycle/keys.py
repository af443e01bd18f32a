"""Names on a node: the lifecycle record, and the facts other components propose.

The record (annotations, written by whichever write changes the state, so a
restart resumes from it):

  ``<domain>/lifecycle-state``     joining, validating, in-service, ...
  ``<domain>/lifecycle-since``     when the state began (epoch seconds)
  ``<domain>/lifecycle-reason``    why
  ``<domain>/lifecycle-next``      the next step and its deadline, for people
  ``<domain>/lifecycle-escalated`` the state whose deadline already escalated (never twice)
  ``<domain>/lifecycle-terminate-requested``  when the machine was asked to go (never twice)
  ``<domain>/lifecycle-gang``      the gang repair window the node is in (``<ns>/<gang>@<start>``): the
                                   nodes of one gang repaired together, one disruption

Facts are the markers the components already write (health's quarantine
taint and ``health-*`` annotations, preflight's gate taint/label and
``preflight-*`` annotations, the team label); their names are defined here
once, and the components take them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetkeeper.core.domain import Names


@dataclass(frozen=True)
class RecordKeys:
    names: Names

    def _k(self, s: str) -> str:
        return f"{self.names.domain}/lifecycle-{s}"

    @property
    def state(self) -> str:
        return self._k("state")

    @property
    def since(self) -> str:
        return self._k("since")

    @property
    def reason(self) -> str:
        return self._k("reason")

    @property
    def next(self) -> str:
        return self._k("next")

    @property
    def escalated(self) -> str:
        return self._k("escalated")

    @property
    def terminate_requested(self) -> str:
        return self._k("terminate-requested")

    @property
    def gang(self) -> str:
        return self._k("gang")

    @property
    def checkpoint_grace(self) -> str:
        """Pod annotation: how long non-urgent remediation waits for the job to checkpoint (e.g. ``10m``)."""
        return f"{self.names.domain}/checkpoint-grace"

    def all(self) -> tuple[str, ...]:
        return (self.state, self.since, self.reason, self.next, self.escalated, self.terminate_requested, self.gang)


class HealthKeys:
    """Annotation keys of the remediation controller's markers on the node (all level-based)."""

    def __init__(self, names: Names):
        d = names.domain
        self.action = f"{d}/health-action"  # quarantine | drain | terminate: the ladder's target
        self.remedy = f"{d}/health-remedy"  # reset | reboot | replace | investigate | wait
        self.reason = f"{d}/health-reason"  # "Type/Reason; ..." of the problems acted on
        self.types = f"{d}/health-types"  # condition types that must clear
        self.since = f"{d}/health-since"  # when the node was quarantined (epoch seconds)
        self.drained = f"{d}/health-drained-at"
        self.cleared = f"{d}/health-cleared-at"  # hold mode: when the conditions cleared
        self.state = f"{d}/health-state"  # validating: handed to the preflight gate
        self.history = f"{d}/health-history"  # JSON list of [time, text], newest last
        self.ignore = f"{d}/health-ignore"  # "true": an operator took over this node
        self.request = f"{d}/action-request"  # a node-local action asked of the node's agent (health.actionproto)
        self.result = f"{d}/action-result"  # and the agent's report
        self.window = RecordKeys(names).gang  # the gang repair window the node is in (one disruption)

    def all_state(self) -> tuple[str, ...]:
        return (self.action, self.remedy, self.reason, self.types, self.since, self.drained, self.cleared, self.state,
                self.request, self.result, self.window)


@dataclass(frozen=True)
class PreflightFactKeys:
    """The preflight gate's markers that the lifecycle reads."""

    names: Names

    @property
    def gate(self) -> str:
        return self.names.preflight

    @property
    def attempts(self) -> str:
        return f"{self.names.domain}/preflight-attempts"

    @property
    def failed_check(self) -> str:
        return f"{self.names.domain}/preflight-failed-check"

    @property
    def gated_at(self) -> str:
        return f"{self.names.domain}/preflight-gated-at"

    @property
    def validated_at(self) -> str:
        return self.names.validated_at
