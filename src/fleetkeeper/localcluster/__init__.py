"""A real local control plane on loopback: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and KWOK simulating GPU and CPU
nodes. Used by ``fleetkeeper cluster``, ``make demo``, the end-to-end tests
and the benchmarks. The same fleetkeeper code that runs here runs against a
real cluster; only the nodes are simulated.
"""
