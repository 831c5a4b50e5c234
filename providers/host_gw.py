"""host-gw: a kernel route to each peer's subnet via the peer's public IP (flannel.md §3).

Every peer must be one hop away on the external interface, so all nodes share one L2 segment.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cloudroutes.backend import BackendContext, RouteTableBinding
from cloudroutes.errors import ConfigError
from cloudroutes.lease import NO_IPV4, Lease, LeaseAttrs
from cloudroutes.routes import Route
from providers.kernel import KernelRouteTable

BACKEND_TYPE = "host-gw"
NAT_ERROR = (
    "your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
    "which is not supported by host-gw backend"
)
OFFLINK_HINT = "host-gw needs every node in one L2 segment (or use vxlan)"


class HostGwBackend:
    def __init__(self, ctx: BackendContext, *, netns: str | None = None) -> None:
        iface = ctx.iface
        # A peer sends to our public IP as a next hop on its own link: behind NAT that address
        # is not on the link at all.
        if (iface.public_ip is not None and iface.public_ip != iface.ip) or (
            iface.public_ipv6 is not None and iface.public_ipv6 != iface.ipv6
        ):
            raise ConfigError(NAT_ERROR)
        self._iface = iface
        self._netns = netns

    @property
    def mtu(self) -> int:
        return self._iface.mtu

    def prepare(self) -> LeaseAttrs:
        return LeaseAttrs(
            public_ip=self._iface.public_ip or self._iface.ip or NO_IPV4,
            public_ipv6=self._iface.public_ipv6 or self._iface.ipv6,
            backend_type=BACKEND_TYPE,
        )

    def bind(self, own: Lease) -> Sequence[RouteTableBinding]:
        table = KernelRouteTable(netns=self._netns, offlink_hint=OFFLINK_HINT)

        def desired(leases: list[Lease]) -> Iterator[Route]:
            return desired_routes(leases, own, self._iface.name)

        return [RouteTableBinding(table, desired)]


def desired_routes(leases: list[Lease], own: Lease, device: str) -> Iterator[Route]:
    """One route per family per peer lease; leases of other backends are ignored, as flannel
    ignores them."""
    for lease in leases:
        if lease.key == own.key or lease.backend_type != BACKEND_TYPE:
            continue
        if lease.subnet is not None and lease.public_ip != NO_IPV4:
            yield Route(lease.subnet, str(lease.public_ip), device=device, lease_key=lease.key)
        if lease.ipv6_subnet is not None and lease.attrs.public_ipv6 is not None:
            yield Route(
                lease.ipv6_subnet,
                str(lease.attrs.public_ipv6),
                device=device,
                lease_key=lease.key,
            )
