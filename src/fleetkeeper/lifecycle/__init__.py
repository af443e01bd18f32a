"""The node lifecycle: one place that says what state a node is in, what
fleetkeeper's taints, labels and annotations on it must be, how long the state
may last and what happens when it lasts too long; the one disruption budget
every capacity-removing action asks; and which pods form a gang that is
evicted as one.

* :mod:`.machine`  the state machine, a pure function of facts (health faults,
  preflight results, maintenance, team) and the node's stored record;
* :mod:`.budget`   pure admission against the budget, with the actions in
  flight as input, and the ledger of those actions;
* :mod:`.gangs`    gang membership and the gang-wide eviction set;
* :mod:`.config`   deadlines, escalations and the budget, validated;
* :mod:`.keys`     the names of the record and of the facts on a node;
* :mod:`.controller` the lifecycle controller (applies escalations through
  the core applier) and :func:`.controller.setup`.

Layering: below the components (which import it for the record, the budget
and gangs) and above the core; it imports no component.
"""
