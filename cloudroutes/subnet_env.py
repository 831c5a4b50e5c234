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


def check_subnet_file(path: str | Path) -> None:
    """Refuse a --subnet-file that could not be written, before the agent takes anything.

    Nothing is created: the first directory on the path that exists must be a writable
    directory (write_subnet_env creates the rest), and the file, if there, a regular file.
    """
    target = Path(path)
    fix = "give a file path such as /run/flannel/subnet.env"
    if not target.name or str(path).endswith("/") or target.is_dir():
        raise ConfigError(f"--subnet-file {path} is a directory; {fix}")
    if target.exists() and not target.is_file():
        raise ConfigError(f"--subnet-file {path} is not a regular file; {fix}")
    parent = target.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"--subnet-file {path}: {parent} is not a directory, so the file cannot be "
            f"created; {fix}"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--subnet-file {path}: cannot write in {parent} (read-only or no permission); "
            "make it writable for the agent or choose another path"
        )


def read_subnet_env(path: str | Path) -> dict[str, str]:
    """KEY=VALUE pairs of an existing file; empty when there is none.

    Read as flanneld reads it (godotenv): ``export`` prefixes, comments and quoted values are
    accepted, so a file written by hand or by another tool still gives the previous subnet.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"cannot read subnet file {path}: {why}") from None
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or key.startswith("#"):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def read_previous(path: str | Path) -> SubnetEnv | None:
    """What this node wrote last time, or None when there is no usable file.

    A damaged file only costs the node its old subnet, never its start.
    """
    values = read_subnet_env(path)
    if not values:
        return None
    try:
        return SubnetEnv(
            network=_optional(IPv4Network, values.get("FLANNEL_NETWORK")),
            subnet=_optional_iface(IPv4Interface, values.get("FLANNEL_SUBNET")),
            ipv6_network=_optional(IPv6Network, values.get("FLANNEL_IPV6_NETWORK")),
            ipv6_subnet=_optional_iface(IPv6Interface, values.get("FLANNEL_IPV6_SUBNET")),
            mtu=int(values.get("FLANNEL_MTU") or 0),
            ipmasq=values.get("FLANNEL_IPMASQ") == "true",
        )
    except ValueError:
        return None


def _optional(kind: type, text: str | None):  # type: ignore[no-untyped-def]
    return kind(text) if text else None


def _optional_iface(kind: type, text: str | None):  # type: ignore[no-untyped-def]
    # FLANNEL_SUBNET holds the first host address; the lease is its network.
    return kind(text).network if text else None
