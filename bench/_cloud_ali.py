"""bench/cloud_api.py's ali-vpc: the Alibaba VPC API fake behind the counting proxy, an ECS
instance per node, and flannel v0.19's ali-vpc as the baseline.

flanneld's ali-vpc, at every start of a node, lists the table, deletes the entries to its own
instance for other destinations, and creates its own with CreateRouteEntry (one entry per
call; an entry already there answers InvalidCIDRBlock.Duplicate, which it takes as done).
Its list here is the same paged DescribeRouteEntryList cloudroutes makes, so the two read
alike per page.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cloudroutes.backend import BackendContext
from cloudroutes.lab.alibaba import AlibabaVpcApi, LabAlibabaVpc, make_alibaba_vpc
from cloudroutes.lab.fault_proxy import ALIBABA, FaultProxy
from cloudroutes.lease import Lease, LeaseAttrs
from providers import ali_route_table, ali_vpc
from providers.ali_route_table import DUPLICATE, PAGE, Credentials, VpcClient, listed, parse_entries


class AliDriver:
    name = ali_vpc.BACKEND_TYPE
    api = "VPC API"
    all_agents = 50

    def __init__(self, nodes: int, network: str) -> None:
        self._stack = contextlib.ExitStack()
        try:
            self.fake = self._stack.enter_context(AlibabaVpcApi())
            self.proxy = self._stack.enter_context(FaultProxy(self.fake.url, dialect=ALIBABA))
            self.vpc: LabAlibabaVpc = make_alibaba_vpc(self.fake, nodes=nodes)
            # No quota in the way: the quota raised, as 1,000 entries need.
            self.fake.set_route_quota(100_000)
            key = self.vpc.credentials
            credentials = Credentials(key.key_id, key.secret)
            # The agents' client, shared (one per agent would only cost the bench time).
            self.client = VpcClient(self.proxy.url, self.vpc.region, lambda: credentials)
        except BaseException:
            self._stack.close()
            raise

    def new_table(self) -> str:
        return self.fake.add_route_table(self.vpc.vpc_id)

    def backend_options(self, table_id: str) -> dict[str, Any]:
        return {"RouteTableIDs": [table_id]}

    def lease(self, i: int, subnet: IPv4Network) -> Lease:
        instance = self.vpc.instances[i]
        return Lease(
            subnet=subnet,
            attrs=LeaseAttrs(
                public_ip=IPv4Address(instance.private_ip),
                backend_type=ali_vpc.BACKEND_TYPE,
                backend_data={"InstanceID": instance.instance_id, "Region": self.vpc.region},
            ),
            store_lease_id=1000 + i,
        )

    def target(self, i: int) -> str:
        return self.vpc.instances[i].instance_id

    def routes(self, table_id: str) -> dict[str, str]:
        return {e.destination: e.next_hop_id for e in self.fake.entries(table_id)}

    @contextlib.contextmanager
    def seams(self) -> Iterator[None]:
        """No minute of grace before the collector may judge an entry, and no settle time
        (the fake's entries are Available at once)."""
        saved = (ali_route_table.LEDGER_GRACE, ali_route_table.SETTLE)
        ali_route_table.LEDGER_GRACE = ali_route_table.SETTLE = 0.0
        try:
            yield
        finally:
            ali_route_table.LEDGER_GRACE, ali_route_table.SETTLE = saved

    def backend(self, ctx: BackendContext, i: int, table_id: str) -> ali_vpc.AliVpcBackend:
        """Node i's backend on the shared client, its identity known without the metadata
        server (a start-up cost, the same for flanneld)."""
        backend = ali_vpc.AliVpcBackend(ctx)
        instance = self.vpc.instances[i]
        identity = ali_vpc.NodeIdentity(
            instance.instance_id, self.vpc.region, self.vpc.vpc_id, instance.vswitch_id, ""
        )
        backend.identity = lambda: identity  # type: ignore[method-assign]
        backend.client = lambda: self.client  # type: ignore[method-assign]
        return backend

    def flannel_start(self, table_id: str, i: int, lease: Lease) -> None:
        from aliyunsdkcore.acs_exception.exceptions import ServerException
        from aliyunsdkvpc.request.v20160428.CreateRouteEntryRequest import (
            CreateRouteEntryRequest,
        )
        from aliyunsdkvpc.request.v20160428.DeleteRouteEntryRequest import (
            DeleteRouteEntryRequest,
        )

        instance = self.target(i)
        subnet = str(lease.subnet)
        for entry in self._flannel_list(table_id):
            if entry.hop_id == instance and str(entry.destination) != subnet:
                delete = DeleteRouteEntryRequest()
                delete.set_RouteEntryId(entry.entry_id)
                self.client.call(delete)
        create = CreateRouteEntryRequest()
        create.set_RouteTableId(table_id)
        create.set_DestinationCidrBlock(subnet)
        create.set_NextHopType("Instance")
        create.set_NextHopId(instance)
        try:
            self.client.call(create)
        except ServerException as exc:
            if exc.get_error_code() not in DUPLICATE:
                raise

    def _flannel_list(self, table_id: str) -> list[ali_route_table.AliEntry]:
        from aliyunsdkvpc.request.v20160428.DescribeRouteEntryListRequest import (
            DescribeRouteEntryListRequest,
        )

        entries: list[ali_route_table.AliEntry] = []
        token = ""
        while True:
            request = DescribeRouteEntryListRequest()
            request.set_RouteTableId(table_id)
            request.set_RouteEntryType("Custom")
            request.set_MaxResult(PAGE)
            if token:
                request.set_NextToken(token)
            answer = self.client.call(request)
            entries.extend(parse_entries(listed(answer, "RouteEntrys", "RouteEntry")))
            token = str(answer.get("NextToken") or "")
            if not token:
                return entries

    def close(self) -> None:
        self._stack.close()
