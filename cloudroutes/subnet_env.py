"""subnet.env: the node's subnet handed to Docker and to the CNI plugin, in flannel's format."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

from cloudroutes.errors import ConfigError

DEFAULT_PATH = "/run/flannel/subnet.env"


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network | None
    subnet: IPv4Network | None
    mtu: int
    ipmasq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None

    def render(self) -> str:
        lines = []
        if self.network is not None and self.subnet is not None:
            lines.append(f"FLANNEL_NETWORK={self.network}")
            lines.append(f"FLANNEL_SUBNET={_first_host(self.subnet)}")
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}")
            lines.append(f"FLANNEL_IPV6_SUBNET={_first_host(self.ipv6_subnet)}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}")
        return "\n".join(lines) + "\n"


def _first_host(subnet: IPv4Network | IPv6Network) -> str:
    return f"{subnet.network_address + 1}/{subnet.prefixlen}"


def write_subnet_env(path: str | Path, env: SubnetEnv) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    target = Path(path)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet.env.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(env.render())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_subnet_env(path: str | Path) -> dict[str, str]:
    """KEY=VALUE pairs of an existing file; empty when there is none."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read subnet file {path}: {exc.strerror}") from None
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = value
    return values


def previous_subnets(path: str | Path) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The subnets this node held before (FLANNEL_SUBNET masked back to its network)."""
    values = read_subnet_env(path)
    v4 = v6 = None
    try:
        if values.get("FLANNEL_SUBNET"):
            v4 = IPv4Interface(values["FLANNEL_SUBNET"]).network
        if values.get("FLANNEL_IPV6_SUBNET"):
            v6 = IPv6Interface(values["FLANNEL_IPV6_SUBNET"]).network
    except ValueError:
        return None, None  # a damaged file only costs us the old subnet, never the start
    return v4, v6


def previous_network(path: str | Path) -> tuple[IPv4Network | None, IPv6Network | None]:
    values = read_subnet_env(path)
    try:
        v4 = IPv4Network(values["FLANNEL_NETWORK"]) if values.get("FLANNEL_NETWORK") else None
        v6 = (
            IPv6Network(values["FLANNEL_IPV6_NETWORK"])
            if values.get("FLANNEL_IPV6_NETWORK")
            else None
        )
    except ValueError:
        return None, None
    return v4, v6
