"""Shared fixtures: a real etcd, and network namespaces cleaned up after each test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lab.netns import Netns, Underlay, unique_name

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    cluster = EtcdCluster().start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def netns() -> Iterator[Callable[[str], Netns]]:
    """A factory of namespaces, each deleted when the test ends."""
    made: list[Netns] = []

    def make(prefix: str = "ns") -> Netns:
        ns = Netns(unique_name(prefix))
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.delete()


@pytest.fixture
def underlay() -> Iterator[Underlay]:
    switch = Underlay(unique_name("sw"))
    try:
        yield switch
    finally:
        switch.delete()
