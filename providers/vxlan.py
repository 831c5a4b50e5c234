"""vxlan: peers reached through the overlay device ``flannel.<VNI>``, wire-compatible with
flanneld's vxlan backend.

Options (the ``Backend`` object of the network config, keys in any case, as flanneld reads
them): ``VNI`` (default 1), ``Port`` (default 0: the kernel's, 8472), ``MTU`` (the underlay
MTU the device's is computed from; default the external interface's), ``GBP``, ``Learning``
(default false) and ``DirectRouting`` (a peer on a connected subnet of the external interface
gets a plain host-gw route instead).

Each address family the network enables has its own device, as flanneld's: ``flannel.<VNI>``
(local VTEP address: the node's public IPv4 address, MTU - 50) and ``flannel-v6.<VNI>`` (the
public IPv6 address, MTU - 70, as an IPv6 outer header is 20 bytes longer), on the same
external interface with the same options. The lease carries the IPv4 device's VtepMAC in
BackendData and the IPv6 one's in BackendV6Data; each family's peers get their own route table.
subnet.env's MTU is the smaller device MTU, as a pod's one interface carries both families
(flanneld writes MTU - 50 there even with IPv6, too big for an IPv6 underlay).

A device's MAC is the node's VtepMAC, published in its lease; peers program it into their
neighbour and FDB entries, so it must survive restarts and reboots (flannel issues #1795,
#533). It is kept in ``<state dir>/vxlan-<VNI>-<VTEP address>.mac`` (IPv6:
``vxlan-v6-<VNI>-<VTEP address>.mac``); the state dir is ``$CLOUDROUTES_STATE_DIR``, else
``/var/lib/cloudroutes``. A device that exists and fits the config is reused (a restart changes
nothing on it); one that does not fit is deleted and made again, with one log line. A device of
a family the network no longer enables, or of another VNI, is deleted with its peers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import re
import secrets
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

from cloudroutes.backend import BackendContext, RouteTableBinding
from cloudroutes.config import BackendOptions
from cloudroutes.errors import ConfigError, LeaseRefused, Transient
from cloudroutes.jsonfields import FoldedObject
from cloudroutes.lease import NO_IPV4, Lease, LeaseAttrs
from cloudroutes.routes import Entry, Route
from providers.host_gw import blackhole_routes
from providers.kernel import KernelRouteTable
from providers.vxlan_table import VxlanPeer, VxlanRouteTable

log = logging.getLogger(__name__)

BACKEND_TYPE = "vxlan"
# Outer IPv4 (20), UDP (8), VXLAN (8) and inner Ethernet (14) headers.
ENCAP_OVERHEAD = 50
# The same with an outer IPv6 header (40).
ENCAP_OVERHEAD_V6 = 70
# The kernel turns IPv6 off on a link with a smaller MTU (RFC 8200).
IPV6_MIN_MTU = 1280
IFA_F_NODAD = 0x02
DEFAULT_VNI = 1
KERNEL_DEFAULT_PORT = 8472
MAX_VNI = (1 << 24) - 1
MIN_MTU = 68 + ENCAP_OVERHEAD
STATE_DIR_ENV = "CLOUDROUTES_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/cloudroutes"
# Kernels before 5.7 corrupt the UDP checksum of vxlan packets that are NATed twice with
# checksum offload on (flannel #1279, fixed by "netfilter: nat: never update the UDP checksum
# when it's 0"); there the device's tx-checksum-ip-generic is turned off.
CHECKSUM_FIX_KERNEL = (5, 7)
_MAC = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}")
_DEVICE = re.compile(r"flannel(-v6)?\.(\d+)")
# What pyroute2 raises when the kernel refuses or the socket fails.
KERNEL_ERRORS = (OSError, PyrouteError)


def kernel_text(exc: Exception) -> str:
    """A kernel error in words ("File exists"), whoever raised it."""
    if isinstance(exc, PyrouteError):
        return os.strerror(exc.code) if exc.code else str(exc)
    return getattr(exc, "strerror", None) or str(exc)


@dataclass(frozen=True)
class VxlanOptions:
    vni: int = DEFAULT_VNI
    port: int = 0
    mtu: int | None = None
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False

    @property
    def device(self) -> str:
        return f"flannel.{self.vni}"

    @property
    def device_v6(self) -> str:
        return f"flannel-v6.{self.vni}"

    @classmethod
    def parse(cls, backend: BackendOptions) -> VxlanOptions:
        """The options, or ConfigError naming the first bad one."""
        return cls(
            vni=_int_option(backend, "VNI", DEFAULT_VNI, 0, MAX_VNI),
            port=_int_option(backend, "Port", 0, 0, 65535),
            mtu=_int_option(backend, "MTU", None, MIN_MTU, 65535),
            gbp=_bool_option(backend, "GBP"),
            learning=_bool_option(backend, "Learning"),
            direct_routing=_bool_option(backend, "DirectRouting"),
        )


def _int_option(backend: BackendOptions, name: str, default: Any, low: int, high: int) -> Any:
    value = backend.get(name, None)
    if value is None:
        return default
    # JSON numbers only (flanneld's Go decoder refuses "1" and true), whole and in range.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"vxlan backend: Backend.{name} must be a whole number from {low} to {high}, "
            f"not {value!r}; fix it in the network config"
        )
    return value


def _bool_option(backend: BackendOptions, name: str) -> bool:
    value = backend.get(name, False)
    if not isinstance(value, bool):
        raise ConfigError(
            f"vxlan backend: Backend.{name} must be true or false, not {value!r}; "
            "fix it in the network config"
        )
    return value


def parse_mac(text: object) -> str | None:
    """A 6-byte MAC in lower-case colon form, as flanneld writes VtepMAC; None if it is not."""
    if not isinstance(text, str) or not _MAC.fullmatch(text):
        return None
    mac = text.lower().replace("-", ":")
    first = int(mac[:2], 16)
    return None if first & 1 else mac  # a multicast MAC cannot be a VTEP's


def random_mac() -> str:
    """Random, unicast, locally administered (flanneld's mac.NewHardwareAddr)."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return raw.hex(":")


def lease_data(vni: int, mac: str) -> dict[str, Any]:
    """flanneld's BackendData, field order included: {"VNI":1,"VtepMAC":"..."}."""
    return {"VNI": vni, "VtepMAC": mac}


def needs_checksum_fix(release: str) -> bool:
    """Whether this kernel has the vxlan checksum bug of flannel #1279."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        return False
    return (int(match[1]), int(match[2])) < CHECKSUM_FIX_KERNEL


# --- the VtepMAC, kept across restarts --------------------------------------------------------


def read_mac(path: Path) -> str | None:
    """The stored VtepMAC; None when there is none or it is unusable (it is then replaced)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s (%s); a new VtepMAC will be stored", path, exc.strerror)
        return None
    mac = parse_mac(text)
    if mac is None:
        log.warning("%s does not hold a MAC address; a new VtepMAC will be stored", path)
    return mac


def write_mac(path: Path, mac: str) -> None:
    """Atomically: a crash leaves the old MAC or the new one, never half a file."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(mac + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the device -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """What ``flannel.<VNI>`` (or ``flannel-v6.<VNI>``, with an IPv6 ``local``) must be."""

    name: str
    vni: int
    port: int
    gbp: bool
    learning: bool
    local: IPv4Address | IPv6Address
    underlay: int  # the external interface's index
    mtu: int
    mac: str

    def incompatible(self, link: Any) -> str:
        """Why an existing link cannot serve as this device ("" when it can), flanneld's list."""
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind != "vxlan":
            return f"link type: {kind} vs vxlan"
        data = info.get_attr("IFLA_INFO_DATA")
        local = "IFLA_VXLAN_LOCAL" if self.local.version == 4 else "IFLA_VXLAN_LOCAL6"
        checks = (
            ("vni", data.get_attr("IFLA_VXLAN_ID"), self.vni),
            ("vtep (external) interface", data.get_attr("IFLA_VXLAN_LINK"), self.underlay),
            ("vtep (external) IP", _address_text(data.get_attr(local)), str(self.local)),
            ("port", data.get_attr("IFLA_VXLAN_PORT"), self.port or KERNEL_DEFAULT_PORT),
            ("gbp", bool(data.get_attr("IFLA_VXLAN_GBP")), self.gbp),
        )
        for what, have, want in checks:
            if have != want:
                return f"{what}: {have} vs {want}"
        return ""


def _address_text(value: object) -> object:
    """An address attribute as ``str(ip_address)`` writes it (IPv6 compressed), else as is."""
    if not isinstance(value, str):
        return value
    with contextlib.suppress(ValueError):
        return str(IPv6Address(value)) if ":" in value else value
    return value


def _ipr(netns: str | None) -> IPRoute:
    return IPRoute(netns=netns) if netns else IPRoute()


def ensure_device(spec: DeviceSpec, netns: str | None = None) -> int:
    """Create ``spec.name`` or reuse the compatible one there; give it ``spec.mac``; return its
    index. Raises one of KERNEL_ERRORS when the kernel refuses."""
    with _ipr(netns) as ipr:
        try:
            (link,) = ipr.link("get", ifname=spec.name)
        except PyrouteError as exc:
            if exc.code != errno.ENODEV:
                raise
            link = None
        if link is not None:
            why = spec.incompatible(link)
            if why:
                log.warning(
                    "%s already exists with incompatible configuration (%s); recreating it",
                    spec.name,
                    why,
                )
                ipr.link("del", index=link["index"])
                link = None
        if link is None:
            local = "vxlan_local" if spec.local.version == 4 else "vxlan_local6"
            attrs: dict[str, Any] = {
                "ifname": spec.name,
                "kind": "vxlan",
                "vxlan_id": spec.vni,
                "vxlan_link": spec.underlay,
                local: str(spec.local),
                "vxlan_learning": int(spec.learning),
                "address": spec.mac,
                "mtu": spec.mtu,
            }
            if spec.port:
                attrs["vxlan_port"] = spec.port
            if spec.gbp:
                attrs["vxlan_gbp"] = True
            ipr.link("add", **attrs)
            (link,) = ipr.link("get", ifname=spec.name)
            log.info("created %s (VNI %d, VtepMAC %s)", spec.name, spec.vni, spec.mac)
        index: int = link["index"]
        if link.get_attr("IFLA_MTU") != spec.mtu:
            ipr.link("set", index=index, mtu=spec.mtu)
        _set_mac(ipr, index, spec)
        return index


def remove_other_devices(wanted: Sequence[str], vni: int, netns: str | None = None) -> None:
    """Delete the vxlan devices ``flannel.<n>`` and ``flannel-v6.<n>`` left by an earlier
    config that are not ``wanted`` (the VNI changed, or a family is no longer enabled): their
    peers' neighbour entries, FDB entries and routes go with them. Says why, once each."""
    with _ipr(netns) as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            match = _DEVICE.fullmatch(name)
            if kind != "vxlan" or match is None or name in wanted:
                continue
            if int(match[2]) != vni:
                log.warning("deleting %s: the network config's VNI is now %d", name, vni)
            else:
                family = "IPv6" if match[1] else "IPv4"
                log.warning("deleting %s: the network config does not enable %s", name, family)
            ipr.link("del", index=link["index"])


def _set_mac(ipr: IPRoute, index: int, spec: DeviceSpec) -> None:
    """Give the device the stored VtepMAC, also when udev or systemd changed it (#1795)."""
    (link,) = ipr.link("get", index=index)
    if link.get_attr("IFLA_ADDRESS") == spec.mac:
        return
    log.info("setting %s's MAC back to its VtepMAC %s", spec.name, spec.mac)
    try:
        ipr.link("set", index=index, address=spec.mac)
    except PyrouteError as exc:
        if exc.code != errno.EBUSY:  # this kernel changes the MAC only while the link is down
            raise
        ipr.link("set", index=index, state="down")
        ipr.link("set", index=index, address=spec.mac)


def configure_device(
    index: int,
    address: IPv4Interface | IPv6Interface,
    network: IPv4Network | IPv6Network | None,
    netns: str | None = None,
) -> None:
    """Put ``address`` on the device, remove its other addresses of that family inside the
    Network (#1060), and bring it up."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    interface = IPv4Interface if address.version == 4 else IPv6Interface
    with _ipr(netns) as ipr:
        present = False
        for found in ipr.get_addr(index=index, family=family):
            have = interface(f"{found.get_attr('IFA_ADDRESS')}/{found['prefixlen']}")
            if have == address:
                present = True
            elif network is not None and have.ip in network:
                log.info("removing %s from the vxlan device: not its lease's address", have)
                ipr.addr("del", index=index, address=str(have.ip), prefixlen=have.network.prefixlen)
        if not present:
            # No duplicate address detection: the address is the node's by its lease, and
            # would otherwise be unusable for a second or two.
            flags = {} if address.version == 4 else {"flags": IFA_F_NODAD}
            ipr.addr(
                "add", index=index, address=str(address.ip), prefixlen=address.max_prefixlen,
                **flags,
            )  # fmt: skip
        ipr.link("set", index=index, state="up")


def connected_networks(
    index: int, netns: str | None = None
) -> tuple[IPv4Network | IPv6Network, ...]:
    """The subnets of both families on the external interface: the peers DirectRouting
    reaches directly."""
    with _ipr(netns) as ipr:
        v4 = [
            IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
            for a in ipr.get_addr(index=index, family=socket.AF_INET)
        ]
        v6 = [
            IPv6Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
            for a in ipr.get_addr(index=index, family=socket.AF_INET6)
        ]
    return (*v4, *v6)


def turn_off_tx_checksum(device: str, netns: str | None) -> None:
    command = ["ethtool", "-K", device, "tx-checksum-ip-generic", "off"]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot turn off %s's checksum offload (kernel bug #1279): %s", device, exc)
        return
    if result.returncode != 0:
        log.warning("cannot turn off %s's checksum offload: %s", device, result.stderr.strip())


# --- the backend ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vtep:
    """One address family's device: its name, local VTEP address and where its MAC is kept."""

    version: int  # 4 or 6
    device: str
    local: IPv4Address | IPv6Address
    overhead: int
    mac_file: Path

    @property
    def table_name(self) -> str:
        return "kernel" if self.version == 4 else "kernel-v6"


class VxlanBackend:
    """The vxlan backend; see the module doc."""

    accepts = frozenset({BACKEND_TYPE})

    def __init__(
        self, ctx: BackendContext, *, netns: str | None = None, state_dir: str | None = None
    ) -> None:
        iface = ctx.iface
        if iface is None or ctx.controller:
            raise ConfigError(
                "vxlan peers are kernel entries that each node's agent programs; "
                "`cloudroutes controller` serves the cloud backends only"
            )
        config = ctx.config
        self.options = VxlanOptions.parse(config.backend)
        self._iface = iface
        self._config = config
        self._netns = netns
        self._blackhole = ctx.blackhole_own_subnet
        directory = Path(
            state_dir or ctx.state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
        )
        vni = self.options.vni
        vteps: list[Vtep] = []
        self._public_ip: IPv4Address | None = None
        self._public_ipv6: IPv6Address | None = None
        # State files are named by VTEP address too: nodes that share a filesystem (namespaces
        # on one host) or a disk image with the file in it never share a VtepMAC.
        if config.enable_ipv4:
            local = iface.public_ip or iface.ip
            if local is None:
                raise ConfigError(
                    f"vxlan backend: interface {iface.name} has no IPv4 address for the VTEP; "
                    "choose another with --iface or set --public-ip"
                )
            self._public_ip = local
            name = directory / f"vxlan-{vni}-{local}.mac"
            vteps.append(Vtep(4, self.options.device, local, ENCAP_OVERHEAD, name))
        if config.enable_ipv6:
            local6 = iface.public_ipv6 or iface.ipv6
            if local6 is None:
                raise ConfigError(
                    f"vxlan backend: interface {iface.name} has no IPv6 address for the VTEP of "
                    f"{self.options.device_v6}; choose another with --iface or set --public-ipv6"
                )
            self._public_ipv6 = local6
            name = directory / f"vxlan-v6-{vni}-{local6}.mac"
            vteps.append(Vtep(6, self.options.device_v6, local6, ENCAP_OVERHEAD_V6, name))
            underlay = self.options.mtu or iface.mtu
            if underlay - ENCAP_OVERHEAD_V6 < IPV6_MIN_MTU:
                raise ConfigError(
                    f"vxlan backend: {self.options.device_v6} would get MTU "
                    f"{underlay - ENCAP_OVERHEAD_V6}, below IPv6's minimum {IPV6_MIN_MTU}; "
                    f"IPv6 needs an underlay MTU (Backend.MTU or {iface.name}'s) of at least "
                    f"{IPV6_MIN_MTU + ENCAP_OVERHEAD_V6}"
                )
        if not vteps:
            raise ConfigError(
                "vxlan backend: the network config enables neither IPv4 nor IPv6; "
                "set EnableIPv4 or EnableIPv6"
            )
        self.vteps: tuple[Vtep, ...] = tuple(vteps)
        self._macs: dict[int, str] = {}
        self._own: Lease | None = None
        self._connected: tuple[IPv4Network | IPv6Network, ...] = ()

    @property
    def mtu(self) -> int:
        """subnet.env's MTU: the smaller of the devices' (see the module doc)."""
        return min(self.device_mtu(v) for v in self.vteps)

    def device_mtu(self, vtep: Vtep) -> int:
        return (self.options.mtu or self._iface.mtu) - vtep.overhead

    @property
    def device(self) -> str:
        """The first family's device (flannel.<VNI> unless the network is IPv6-only)."""
        return self.vteps[0].device

    @property
    def mac_file(self) -> Path:
        return self.vteps[0].mac_file

    @property
    def mac(self) -> str:
        return self.mac_of(self.vteps[0].version)

    def mac_of(self, version: int) -> str:
        """The VtepMAC of the IPv4 (4) or IPv6 (6) device; "" before prepare()."""
        return self._macs.get(version, "")

    def vtep(self, version: int) -> Vtep | None:
        return next((v for v in self.vteps if v.version == version), None)

    def spec(self, vtep: Vtep | None = None) -> DeviceSpec:
        vtep = vtep or self.vteps[0]
        return DeviceSpec(
            name=vtep.device,
            vni=self.options.vni,
            port=self.options.port,
            gbp=self.options.gbp,
            learning=self.options.learning,
            local=vtep.local,
            underlay=self._iface.index,
            mtu=self.device_mtu(vtep),
            mac=self.mac_of(vtep.version),
        )

    def prepare(self) -> LeaseAttrs:
        """Make (or reuse) each family's device with its VtepMAC, and publish them."""
        for vtep in self.vteps:
            mac = read_mac(vtep.mac_file) or self._existing_mac(vtep) or random_mac()
            self._macs[vtep.version] = mac
            try:
                write_mac(vtep.mac_file, mac)
            except OSError as exc:
                raise ConfigError(
                    f"cannot keep the VtepMAC in {vtep.mac_file}: {exc.strerror}; set "
                    f"{STATE_DIR_ENV} to a writable directory that survives reboots"
                ) from None
        try:
            remove_other_devices([v.device for v in self.vteps], self.options.vni, self._netns)
        except KERNEL_ERRORS as exc:
            log.warning("cannot remove stale vxlan devices: %s", kernel_text(exc))
        for vtep in self.vteps:
            self._ensure(vtep)
        try:
            self._connected = connected_networks(self._iface.index, self._netns)
        except KERNEL_ERRORS as exc:
            raise Transient(
                f"cannot read {self._iface.name}'s addresses: {kernel_text(exc)}"
            ) from None
        # flanneld publishes only the enabled families: an IPv6-only lease has PublicIP
        # 0.0.0.0 and no BackendData.
        vni = self.options.vni
        return LeaseAttrs(
            public_ip=self._public_ip or NO_IPV4,
            public_ipv6=self._public_ipv6,
            backend_type=BACKEND_TYPE,
            backend_data=lease_data(vni, self.mac_of(4)) if self._public_ip else None,
            backend_v6_data=lease_data(vni, self.mac_of(6)) if self._public_ipv6 else None,
        )

    def _existing_mac(self, vtep: Vtep) -> str | None:
        """The MAC of a compatible device left by an earlier run (or flanneld): reused, so
        peers' entries stay right."""
        with contextlib.suppress(*KERNEL_ERRORS, ValueError), _ipr(self._netns) as ipr:
            (link,) = ipr.link("get", ifname=vtep.device)
            if not self.spec(vtep).incompatible(link):
                return parse_mac(link.get_attr("IFLA_ADDRESS"))
        return None

    def _ensure(self, vtep: Vtep) -> None:
        try:
            index = ensure_device(self.spec(vtep), self._netns)
            own = self._own
            if own is not None:
                if vtep.version == 4 and own.subnet is not None:
                    address: IPv4Interface | IPv6Interface = IPv4Interface(
                        f"{own.subnet.network_address}/32"
                    )
                    configure_device(index, address, self._config.network, self._netns)
                elif vtep.version == 6 and own.ipv6_subnet is not None:
                    address = IPv6Interface(f"{own.ipv6_subnet.network_address}/128")
                    configure_device(index, address, self._config.ipv6_network, self._netns)
        except KERNEL_ERRORS as exc:
            raise Transient(f"cannot set up {vtep.device}: {kernel_text(exc)}") from None
        if needs_checksum_fix(platform.release()):
            turn_off_tx_checksum(vtep.device, self._netns)

    def bind(self, own: Lease) -> Sequence[RouteTableBinding]:
        """One route table per family, sharing the kernel's (module doc)."""
        self._own = own
        routes = KernelRouteTable(netns=self._netns)
        bindings = []
        for vtep in self.vteps:
            self._ensure(vtep)
            table = VxlanRouteTable(
                vtep.device,
                ensure_device=self._ensurer(vtep),
                netns=self._netns,
                routes=routes,
                name=vtep.table_name,
                family=socket.AF_INET if vtep.version == 4 else socket.AF_INET6,
            )
            desired = self.desired if vtep.version == 4 else self.desired_v6
            bindings.append(RouteTableBinding(table, desired))
        return bindings

    def _ensurer(self, vtep: Vtep) -> Callable[[], None]:
        """A table's callback: its device (with its address, up) exists after it."""
        return lambda: self._ensure(vtep)

    def desired(self, lease: Lease) -> Iterator[Entry]:
        """What one lease wants on the IPv4 device: nothing (or a blackhole) for our own, one
        peer for another."""
        if self._is_own(lease):
            yield from self._blackholes(4)
            return
        if lease.subnet is None or lease.public_ip == NO_IPV4:
            return
        yield self._peer(4, lease, lease.subnet, lease.public_ip)

    def desired_v6(self, lease: Lease) -> Iterator[Entry]:
        """What one lease wants on the IPv6 device, as ``desired`` for IPv4: a lease with an
        IPv6 subnet must carry PublicIPv6 and BackendV6Data's VtepMAC, or it is refused here
        (its IPv4 peer, in the other table, stays)."""
        if self._is_own(lease):
            yield from self._blackholes(6)
            return
        if lease.ipv6_subnet is None:
            return  # a peer without IPv6 (flanneld skips it too)
        public = lease.attrs.public_ipv6
        if public is None:
            raise LeaseRefused(
                f"lease {lease.key}: it has the IPv6 subnet {lease.ipv6_subnet} but no "
                "PublicIPv6, so its IPv6 peer cannot be reached over vxlan; its node must run "
                "with IPv6 on its interface (or --public-ipv6)"
            )
        yield self._peer(6, lease, lease.ipv6_subnet, public)

    def _is_own(self, lease: Lease) -> bool:
        return self._own is not None and lease.key == self._own.key

    def _blackholes(self, version: int) -> Iterator[Entry]:
        if self._blackhole and self._own is not None:
            yield from (r for r in blackhole_routes(self._own) if r.destination.version == version)

    def _peer(
        self,
        version: int,
        lease: Lease,
        subnet: IPv4Network | IPv6Network,
        public: IPv4Address | IPv6Address,
    ) -> Entry:
        if self.options.direct_routing and any(public in n for n in self._connected):
            return Route(subnet, str(public), self._iface.name, lease_key=lease.key)
        vtep = self.vtep(version)
        assert vtep is not None, "a table is bound only for an enabled family"
        mac = peer_mac(lease, version)
        if mac == self.mac_of(version):
            # A state file copied with a disk image, or one state dir shared by several nodes.
            raise LeaseRefused(
                f"lease {lease.key}: its VtepMAC {mac} is this node's own; every node needs its "
                f"own: delete {vtep.mac_file} on one of them and restart its agent"
            )
        return VxlanPeer(
            subnet, str(subnet.network_address), mac, str(public), vtep.device, lease_key=lease.key
        )


def peer_mac(lease: Lease, version: int = 4) -> str:
    """The VtepMAC of a peer's lease for one family (BackendData for IPv4, BackendV6Data for
    IPv6); LeaseRefused when it has none."""
    where = "BackendData" if version == 4 else "BackendV6Data"
    data = lease.attrs.backend_data if version == 4 else lease.attrs.backend_v6_data
    value = FoldedObject(data).get("VtepMAC") if isinstance(data, dict) else None
    mac = parse_mac(value)
    if mac is None:
        raise LeaseRefused(
            f"lease {lease.key}: {where}.VtepMAC {value!r} is not a unicast MAC address "
            f'(flanneld writes {where} as {{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}})'
        )
    return mac
