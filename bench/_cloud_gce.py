"""bench/cloud_api.py's gce: the Compute API fake behind the counting proxy, an instance per
node, operations that run OPERATION_SECONDS before they are DONE, and flannel v0.19's gce as
the baseline.

flanneld's gce, at every start of a node, gets its route by name (``flannel-10-5-1-0-24``);
when there is one that differs it deletes it, and when there is none (or it deleted one) it
inserts its own; each write's operation is waited for before the next call. Here it waits
with globalOperations.wait, as cloudroutes does (flanneld polled globalOperations.get, which
costs more calls, not fewer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cloudroutes.backend import BackendContext
from cloudroutes.lab.fault_proxy import GCE, FaultProxy
from cloudroutes.lab.gce import FakeComputeApi, LabGceProject, make_gce_project
from cloudroutes.lease import Lease, LeaseAttrs
from providers import gce, gce_route_table
from providers.gce_api import CALL_TIMEOUT, ComputeClients, flannel_name, resource_path

# A route write is a global operation that takes a while (seconds on GCE); long enough here
# that operations in flight at once show in the time.
OPERATION_SECONDS = 0.02


class GceDriver:
    name = gce.BACKEND_TYPE
    api = "Compute"
    all_agents = 50

    def __init__(self, nodes: int, network: str) -> None:
        self._stack = contextlib.ExitStack()
        self._networks = 0
        try:
            self.fake = self._stack.enter_context(
                FakeComputeApi(operation_seconds=OPERATION_SECONDS)
            )
            self.proxy = self._stack.enter_context(FaultProxy(self.fake.url, dialect=GCE))
            # No quota in the way: the project's ROUTES quota raised, as 1,000 routes need.
            self.project: LabGceProject = make_gce_project(
                self.fake, nodes=nodes, route_quota=100_000
            )
            self.clients = self._clients()
        except BaseException:
            self._stack.close()
            raise

    def _clients(self) -> ComputeClients:
        """The agents' clients, shared (one set per agent would only cost the bench time):
        through the proxy, on the operations' endpoint too. The fake asks for no token."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import compute_v1

        kwargs: dict[str, Any] = {
            "credentials": AnonymousCredentials(),
            "client_options": ClientOptions(api_endpoint=self.proxy.url),
        }
        return ComputeClients(
            project=self.project.project_id,
            routes=compute_v1.RoutesClient(**kwargs),
            operations=compute_v1.GlobalOperationsClient(**kwargs),
            instances=compute_v1.InstancesClient(**kwargs),
        )

    def new_table(self) -> str:
        """A new network of the project: GCE's route table is a network's routes."""
        self._networks += 1
        link = self.fake.add_network(self.project.project_id, f"bench-{self._networks}")
        return resource_path(link)

    def backend_options(self, table_id: str) -> dict[str, Any]:
        return {}  # the table is the node's network

    def lease(self, i: int, subnet: IPv4Network) -> Lease:
        instance = self.project.instances[i]
        return Lease(
            subnet=subnet,
            attrs=LeaseAttrs(
                public_ip=IPv4Address(instance.ip),
                backend_type=gce.BACKEND_TYPE,
                backend_data={
                    "Project": self.project.project_id,
                    "Zone": instance.zone,
                    "Instance": instance.name,
                },
            ),
            store_lease_id=1000 + i,
        )

    def target(self, i: int) -> str:
        return self.project.instances[i].path

    def routes(self, table_id: str) -> dict[str, str]:
        """The network's routes to instances: destination -> instance path."""
        return {
            r["destRange"]: resource_path(r["nextHopInstance"])
            for r in self.fake.routes(self.project.project_id)
            if resource_path(r["network"]) == table_id and r.get("nextHopInstance")
        }

    @contextlib.contextmanager
    def seams(self) -> Iterator[None]:
        """The shared clients, and no minute of grace before the collector may judge a route
        (the bench cannot wait it out)."""
        saved = (gce.compute_clients, gce_route_table.LEDGER_GRACE)
        gce.compute_clients = lambda project: self.clients  # type: ignore[assignment]
        gce_route_table.LEDGER_GRACE = 0.0
        try:
            yield
        finally:
            gce.compute_clients, gce_route_table.LEDGER_GRACE = saved

    def backend(self, ctx: BackendContext, i: int, table_id: str) -> gce.GceBackend:
        """Node i's backend, its identity (and so its network, the table) known without the
        metadata server (a start-up cost, the same for flanneld)."""
        backend = gce.GceBackend(ctx)
        instance = self.project.instances[i]
        identity = gce.NodeIdentity(self.project.project_id, instance.zone, instance.name, table_id)
        backend.identity = lambda: identity  # type: ignore[method-assign]
        return backend

    def flannel_start(self, table_id: str, i: int, lease: Lease) -> None:
        from google.api_core.exceptions import NotFound
        from google.cloud import compute_v1

        routes, project = self.clients.routes, self.project.project_id
        name = flannel_name(lease.subnet)
        instance = self.target(i)
        try:
            found = routes.get(project=project, route=name, timeout=CALL_TIMEOUT)
        except NotFound:
            found = None
        if found is not None:
            if resource_path(found.next_hop_instance) == instance and found.dest_range == str(
                lease.subnet
            ):
                return
            self._wait(routes.delete_unary(project=project, route=name, timeout=CALL_TIMEOUT))
        resource = compute_v1.Route(
            name=name,
            network=table_id,
            dest_range=str(lease.subnet),
            next_hop_instance=instance,
            priority=gce_route_table.PRIORITY,
        )
        self._wait(routes.insert_unary(project=project, route_resource=resource))

    def _wait(self, op: Any) -> None:
        while op.status.name != "DONE":
            op = self.clients.operations.wait(
                project=self.project.project_id, operation=op.name, timeout=CALL_TIMEOUT * 6
            )

    def close(self) -> None:
        self._stack.close()
