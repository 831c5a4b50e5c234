"""host-gw: a kernel route to each peer's subnet via the peer's public IP (flannel.md §3).

Every peer must be one hop away on the external interface, so all nodes share one L2 segment.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from ipaddress import IPv4Network, IPv6Network

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
        if iface is None or ctx.controller:
            raise ConfigError(
                "host-gw routes are kernel routes that each node's agent programs; "
                "`cloudroutes controller` serves the cloud backends only"
            )
        # A peer sends to our public IP as a next hop on its own link: behind NAT that address
        # is not on the link at all.
        if (iface.public_ip is not None and iface.public_ip != iface.ip) or (
            iface.public_ipv6 is not None and iface.public_ipv6 != iface.ipv6
        ):
            raise ConfigError(NAT_ERROR)
        self._iface = iface
        self._config = ctx.config
        self._netns = netns
        self._blackhole = ctx.blackhole_own_subnet

    # Leases of other backends are not ours to route (flannel ignores them; we report them).
    accepts = frozenset({BACKEND_TYPE})

    @property
    def mtu(self) -> int:
        return self._iface.mtu

    def prepare(self) -> LeaseAttrs:
        # flanneld publishes an address only for the families the network enables.
        config, iface = self._config, self._iface
        return LeaseAttrs(
            public_ip=(iface.public_ip or iface.ip or NO_IPV4) if config.enable_ipv4 else NO_IPV4,
            public_ipv6=(iface.public_ipv6 or iface.ipv6) if config.enable_ipv6 else None,
            backend_type=BACKEND_TYPE,
        )

    def bind(self, own: Lease) -> Sequence[RouteTableBinding]:
        table = KernelRouteTable(netns=self._netns, offlink_hint=OFFLINK_HINT)

        def desired(lease: Lease) -> Iterator[Route]:
            if lease.key == own.key:
                return blackhole_routes(own) if self._blackhole else iter(())
            return peer_routes(lease, self._iface.name)

        return [RouteTableBinding(table, desired)]


def peer_routes(lease: Lease, device: str) -> Iterator[Route]:
    """One route per family of a peer's lease, via its public address."""
    if lease.subnet is not None and lease.public_ip != NO_IPV4:
        yield Route(lease.subnet, str(lease.public_ip), device=device, lease_key=lease.key)
    if lease.ipv6_subnet is not None and lease.attrs.public_ipv6 is not None:
        yield Route(
            lease.ipv6_subnet, str(lease.attrs.public_ipv6), device=device, lease_key=lease.key
        )


def blackhole_routes(own: Lease) -> Iterator[Route]:
    """flanneld's --ip-blackhole-route: packets for an unused address of this node's subnet
    are dropped here instead of following the default route out of the node."""
    subnets: tuple[IPv4Network | IPv6Network | None, ...] = (own.subnet, own.ipv6_subnet)
    for subnet in subnets:
        if subnet is not None:
            yield Route(subnet, "blackhole", lease_key=own.key)
