"""The lab leaves no namespace behind, even when Ctrl-C lands while one is being made."""

from __future__ import annotations

import subprocess

import pytest

from cloudroutes.lab.cluster import LabCluster
from cloudroutes.lab.netns import Netns


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def test_an_interrupt_between_netns_add_and_tracking_leaves_no_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = namespaces()
    real_ip = Netns.ip

    def interrupted_once_made(self: Netns, *args: str, check: bool = True) -> str:
        # The switch's namespace exists by now, but Underlay() has not returned.
        if self.name.startswith("crsw") and args == ("link", "set", "lo", "up"):
            raise KeyboardInterrupt
        return real_ip(self, *args, check=check)

    monkeypatch.setattr(Netns, "ip", interrupted_once_made)
    cluster = LabCluster(1, backend="host-gw")
    with pytest.raises(KeyboardInterrupt):
        cluster.build()
    monkeypatch.undo()
    made = namespaces() - before
    assert [name[:4] for name in made] == ["crsw"]  # the window was hit
    cluster.close()
    assert namespaces() - before == set()
