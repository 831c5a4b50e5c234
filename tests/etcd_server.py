"""Kept for test modules written before the lab moved into the package."""

from cloudroutes.lab.etcd import EtcdCluster, EtcdMember, EtcdTLS, free_port

__all__ = ["EtcdCluster", "EtcdMember", "EtcdTLS", "free_port"]
