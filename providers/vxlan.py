"""vxlan: peers reached through the overlay device ``flannel.<VNI>``, wire-compatible with
flanneld's vxlan backend.

Options (the ``Backend`` object of the network config, keys in any case, as flanneld reads
them): ``VNI`` (default 1), ``Port`` (default 0: the kernel's, 8472), ``MTU`` (the underlay
MTU the device's is computed from; default the external interface's), ``GBP``, ``Learning``
(default false) and ``DirectRouting`` (a peer on a connected subnet of the external interface
gets a plain host-gw route instead).

The device's MAC is the node's VtepMAC, published in its lease; peers program it into their
neighbour and FDB entries, so it must survive restarts and reboots (flannel issues #1795,
#533). It is kept in ``<state dir>/vxlan-<VNI>-<VTEP address>.mac``; the state dir is
``$CLOUDROUTES_STATE_DIR``, else ``/var/lib/cloudroutes``. A device that exists and fits the
config is reused (a restart changes nothing on it); one that does not fit is deleted and made
again, with one log line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
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
from providers.vxlan_table import VxlanPeer, VxlanRouteTable

log = logging.getLogger(__name__)

BACKEND_TYPE = "vxlan"
# Outer IPv4 (20), UDP (8), VXLAN (8) and inner Ethernet (14) headers.
ENCAP_OVERHEAD = 50
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
    """What ``flannel.<VNI>`` must be."""

    name: str
    vni: int
    port: int
    gbp: bool
    learning: bool
    local: IPv4Address
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
        checks = (
            ("vni", data.get_attr("IFLA_VXLAN_ID"), self.vni),
            ("vtep (external) interface", data.get_attr("IFLA_VXLAN_LINK"), self.underlay),
            ("vtep (external) IP", data.get_attr("IFLA_VXLAN_LOCAL"), str(self.local)),
            ("port", data.get_attr("IFLA_VXLAN_PORT"), self.port or KERNEL_DEFAULT_PORT),
            ("gbp", bool(data.get_attr("IFLA_VXLAN_GBP")), self.gbp),
        )
        for what, have, want in checks:
            if have != want:
                return f"{what}: {have} vs {want}"
        return ""


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
            attrs: dict[str, Any] = dict(
                ifname=spec.name,
                kind="vxlan",
                vxlan_id=spec.vni,
                vxlan_link=spec.underlay,
                vxlan_local=str(spec.local),
                vxlan_learning=int(spec.learning),
                address=spec.mac,
                mtu=spec.mtu,
            )
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


def remove_other_vnis(vni: int, netns: str | None = None) -> None:
    """Delete the vxlan devices of another VNI (``flannel.<n>``) left by an earlier config: the
    VNI changed, so the device is made anew under its new name, and saying so."""
    with _ipr(netns) as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            if kind == "vxlan" and re.fullmatch(r"flannel\.\d+", name) and name != f"flannel.{vni}":
                log.warning("deleting %s: the network config's VNI is now %d", name, vni)
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
    index: int, address: IPv4Interface, network: IPv4Network | None, netns: str | None = None
) -> None:
    """Put ``address`` on the device, remove its other addresses inside the Network (#1060),
    and bring it up."""
    with _ipr(netns) as ipr:
        present = False
        for found in ipr.get_addr(index=index, family=2):
            have = IPv4Interface(f"{found.get_attr('IFA_ADDRESS')}/{found['prefixlen']}")
            if have == address:
                present = True
            elif network is not None and have.ip in network:
                log.info("removing %s from the vxlan device: not its lease's address", have)
                ipr.addr("del", index=index, address=str(have.ip), prefixlen=have.network.prefixlen)
        if not present:
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=32)
        ipr.link("set", index=index, state="up")


def connected_networks(index: int, netns: str | None = None) -> tuple[IPv4Network, ...]:
    """The IPv4 subnets on the external interface: the peers DirectRouting reaches directly."""
    with _ipr(netns) as ipr:
        return tuple(
            IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
            for a in ipr.get_addr(index=index, family=2)
        )


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
        if config.enable_ipv6 or not config.enable_ipv4:
            raise ConfigError(
                "vxlan backend: only IPv4 networks are supported; remove EnableIPv6 "
                "from the network config or use host-gw"
            )
        self.options = VxlanOptions.parse(config.backend)
        local = iface.public_ip or iface.ip
        if local is None:
            raise ConfigError(
                f"vxlan backend: interface {iface.name} has no IPv4 address for the VTEP; "
                "choose another with --iface or set --public-ip"
            )
        self._iface = iface
        self._local = local
        self._config = config
        self._netns = netns
        self._blackhole = ctx.blackhole_own_subnet
        directory = state_dir or ctx.state_dir or os.environ.get(STATE_DIR_ENV)
        # Named by VTEP address too: nodes that share a filesystem (namespaces on one host) or
        # a disk image with the file in it never share a VtepMAC.
        name = f"vxlan-{self.options.vni}-{local}.mac"
        self.mac_file = Path(directory or DEFAULT_STATE_DIR) / name
        self._mac = ""
        self._own: Lease | None = None
        self._connected: tuple[IPv4Network, ...] = ()

    @property
    def mtu(self) -> int:
        return (self.options.mtu or self._iface.mtu) - ENCAP_OVERHEAD

    @property
    def device(self) -> str:
        return self.options.device

    @property
    def mac(self) -> str:
        return self._mac

    def spec(self) -> DeviceSpec:
        return DeviceSpec(
            name=self.device,
            vni=self.options.vni,
            port=self.options.port,
            gbp=self.options.gbp,
            learning=self.options.learning,
            local=self._local,
            underlay=self._iface.index,
            mtu=self.mtu,
            mac=self._mac,
        )

    def prepare(self) -> LeaseAttrs:
        """Make (or reuse) the device with the node's VtepMAC, and publish it."""
        self._mac = read_mac(self.mac_file) or self._existing_mac() or random_mac()
        try:
            write_mac(self.mac_file, self._mac)
        except OSError as exc:
            raise ConfigError(
                f"cannot keep the VtepMAC in {self.mac_file}: {exc.strerror}; set "
                f"{STATE_DIR_ENV} to a writable directory that survives reboots"
            ) from None
        try:
            remove_other_vnis(self.options.vni, self._netns)
        except KERNEL_ERRORS as exc:
            log.warning("cannot remove vxlan devices of another VNI: %s", kernel_text(exc))
        self._ensure()
        try:
            self._connected = connected_networks(self._iface.index, self._netns)
        except KERNEL_ERRORS as exc:
            raise Transient(
                f"cannot read {self._iface.name}'s addresses: {kernel_text(exc)}"
            ) from None
        return LeaseAttrs(
            public_ip=self._iface.public_ip or self._iface.ip or NO_IPV4,
            backend_type=BACKEND_TYPE,
            backend_data=lease_data(self.options.vni, self._mac),
        )

    def _existing_mac(self) -> str | None:
        """The MAC of a compatible device left by an earlier run (or flanneld): reused, so
        peers' entries stay right."""
        with contextlib.suppress(*KERNEL_ERRORS, ValueError), _ipr(self._netns) as ipr:
            (link,) = ipr.link("get", ifname=self.device)
            if not self.spec().incompatible(link):
                return parse_mac(link.get_attr("IFLA_ADDRESS"))
        return None

    def _ensure(self) -> None:
        try:
            index = ensure_device(self.spec(), self._netns)
            if self._own is not None and self._own.subnet is not None:
                address = IPv4Interface(f"{self._own.subnet.network_address}/32")
                configure_device(index, address, self._config.network, self._netns)
        except KERNEL_ERRORS as exc:
            raise Transient(f"cannot set up {self.device}: {kernel_text(exc)}") from None
        if needs_checksum_fix(platform.release()):
            turn_off_tx_checksum(self.device, self._netns)

    def ensure_device(self) -> None:
        """The table's callback: the device (with its address, up) exists after it."""
        self._ensure()

    def bind(self, own: Lease) -> Sequence[RouteTableBinding]:
        self._own = own
        self._ensure()
        table = VxlanRouteTable(self.device, ensure_device=self.ensure_device, netns=self._netns)
        return [RouteTableBinding(table, self.desired)]

    def desired(self, lease: Lease) -> Iterator[Entry]:
        """What one lease wants: nothing (or a blackhole) for our own, one peer for another."""
        own = self._own
        if own is not None and lease.key == own.key:
            yield from blackhole_routes(own) if self._blackhole else ()
            return
        if lease.subnet is None or lease.public_ip == NO_IPV4:
            return
        if self.options.direct_routing and any(lease.public_ip in n for n in self._connected):
            yield Route(lease.subnet, str(lease.public_ip), self._iface.name, lease_key=lease.key)
            return
        mac = peer_mac(lease)
        if mac == self._mac:
            # A state file copied with a disk image, or one state dir shared by several nodes.
            raise LeaseRefused(
                f"lease {lease.key}: its VtepMAC {mac} is this node's own; every node needs its "
                f"own: delete {self.mac_file} on one of them and restart its agent"
            )
        yield VxlanPeer(
            lease.subnet,
            str(lease.subnet.network_address),
            mac,
            str(lease.public_ip),
            self.device,
            lease_key=lease.key,
        )


def peer_mac(lease: Lease) -> str:
    """The VtepMAC of a peer's lease; LeaseRefused when it has none."""
    data = lease.attrs.backend_data
    value = FoldedObject(data).get("VtepMAC") if isinstance(data, dict) else None
    mac = parse_mac(value)
    if mac is None:
        raise LeaseRefused(
            f"lease {lease.key}: BackendData.VtepMAC {value!r} is not a unicast MAC address "
            '(flanneld writes {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"})'
        )
    return mac
