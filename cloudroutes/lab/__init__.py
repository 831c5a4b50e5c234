"""A lab of real components on one machine: network namespaces, etcd, and a local AWS (moto,
an IMDSv2 stub, a fault-injecting proxy).

The demo builds its cluster with it, and the tests and benchmarks build theirs the same way.
"""
