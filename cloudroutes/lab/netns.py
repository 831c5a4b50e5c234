"""Network namespaces: nodes and pods as real kernel namespaces joined by veths."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Sequence

_counter = itertools.count()


def unique_name(prefix: str) -> str:
    # Namespace and link names are short (15 chars for links): keep the pid part small.
    return f"{prefix}{os.getpid() % 10000}x{next(_counter)}"


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.ip("link", "set", "lo", "up")

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def run(
        self, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            check=check,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kwargs)  # type: ignore[call-overload]

    def ip(self, *args: str, check: bool = True) -> str:
        return self.run("ip", *args, check=check).stdout

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def ping(self, address: str, count: int = 1, timeout: int = 2) -> bool:
        result = self.run(
            "ping", "-c", str(count), "-W", str(timeout), "-i", "0.2", address, check=False
        )
        return result.returncode == 0

    def delete(self) -> None:
        delete_netns(self.name)


def delete_netns(name: str) -> None:
    """Kill what still runs inside ``name``, then drop it (its veth ends go with it); a
    namespace that is not there is no error."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def link_veth(a: Netns, a_name: str, b: Netns, b_name: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    tmp = unique_name("tv")
    subprocess.run(
        ["ip", "link", "add", tmp, "type", "veth", "peer", "name", tmp + "p"], check=True
    )
    subprocess.run(["ip", "link", "set", tmp, "netns", a.name, "name", a_name], check=True)
    subprocess.run(["ip", "link", "set", tmp + "p", "netns", b.name, "name", b_name], check=True)
    a.ip("link", "set", a_name, "up")
    b.ip("link", "set", b_name, "up")


class Underlay:
    """A switch: a namespace holding a bridge that node namespaces plug into."""

    def __init__(self, name: str) -> None:
        self.ns = Netns(name)
        self.ns.ip("link", "add", "br0", "type", "bridge")
        self.ns.ip("link", "set", "br0", "up")
        self._ports = itertools.count()

    def plug(self, node: Netns, ifname: str, address: str) -> None:
        port = f"p{next(self._ports)}"
        link_veth(self.ns, port, node, ifname)
        self.ns.ip("link", "set", port, "master", "br0")
        node.ip("addr", "add", address, "dev", ifname)

    def delete(self) -> None:
        self.ns.delete()
