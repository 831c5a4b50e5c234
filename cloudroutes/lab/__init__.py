"""A lab of real components on one machine: network namespaces and etcd.

The demo builds its cluster with it, and the tests build theirs the same way.
"""
