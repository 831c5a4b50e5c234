"""Lease sources: where the node's own lease and everyone else's come from.

A lease source (etcd, or the Kubernetes Node objects) does four things:

- ``network_config()``: read the network config (blocking until one exists, as flanneld does);
- ``acquire(attrs, ...)``: take a lease for this node, reusing its old subnet where it can;
- ``keep(lease, stop)``: hold the lease: renew it before it expires, put it back when it is
  lost or rewritten; raise LeaseRevoked when an operator deletes it (the node must then stop),
  LeaseError when it cannot be put back (another node holds the subnet now);
- ``watch(table, stop)``: fill the lease table with a snapshot, then with changes, re-listing
  after compaction or a lost watch, until ``stop`` is set;
- ``watch_config(stop, notify)``: call ``notify`` with the network config's raw text each time
  it changes (None when it is deleted), until ``stop`` is set;
- ``store_problem``: why the store is not answering now, one line; None while it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from cloudroutes.config import NetworkConfig
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_table import LeaseTable


class LeaseSource(Protocol):
    def network_config(self, stop: threading.Event | None = None) -> NetworkConfig: ...

    def acquire(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous: tuple[IPv4Network | None, IPv6Network | None] | None = None,
    ) -> Lease: ...

    def keep(self, lease: Lease, stop: threading.Event) -> None: ...

    def watch(self, table: LeaseTable, stop: threading.Event) -> None: ...

    def watch_config(self, stop: threading.Event, notify: Callable[[str | None], None]) -> None: ...

    @property
    def store_problem(self) -> str | None: ...

    def close(self) -> None: ...
