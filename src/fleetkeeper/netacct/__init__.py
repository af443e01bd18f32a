"""Network traffic accounting, its Prometheus exporter, and per-pod internet
egress shaping for a node (issue 7, R12-R13).

Layout:

* :mod:`.settings`  - validated settings and the egress rate syntax
* :mod:`.pods`      - where the agent learns the node's pods (file or caching relay)
* :mod:`.rules`     - pure planning of fleetkeeper's mangle chains
* :mod:`.iptables`  - ``iptables-save -c`` parsing and ``iptables-restore --noflush``
* :mod:`.shaping`   - pure tc HTB planning, ``tc`` output parsing and applying
* :mod:`.metrics`   - Prometheus metrics (agent health and traffic counters)
* :mod:`.agent`     - the sync loop
* :mod:`.cli`       - ``fleetkeeper netacct ...``
"""
