"""The node lock in real network namespaces, held by real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from cloudroutes.lab.netns import Netns
from cloudroutes.lab.process import stop_process
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]

HOLD = (
    "import sys, signal\n"
    "from cloudroutes.node_lock import take_node_lock\n"
    "lock = take_node_lock(157, sys.argv[1])\n"
    "print('held', flush=True)\n"
    "signal.pause()\n"
)
TAKE = (
    "import sys\n"
    "from cloudroutes.errors import ConfigError\n"
    "from cloudroutes.node_lock import take_node_lock\n"
    "try:\n"
    "    take_node_lock(157, 'second')\n"
    "except ConfigError as exc:\n"
    "    print(exc)\n"
    "    sys.exit(1)\n"
    "print('taken')\n"
)


@pytest.fixture
def holders() -> Iterator[Callable[[Netns, str], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def hold(ns: Netns, description: str) -> subprocess.Popen[bytes]:
        proc = ns.popen([sys.executable, "-c", HOLD, description], stdout=subprocess.PIPE)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        return proc

    try:
        yield hold
    finally:
        for proc in started:
            stop_process(proc, kill=True)


def take(ns: Netns) -> subprocess.CompletedProcess[str]:
    return ns.run(sys.executable, "-c", TAKE, check=False)


def test_second_holder_in_a_namespace_is_refused_naming_the_first(
    netns: Callable[[str], Netns], holders: Callable[[Netns, str], subprocess.Popen[bytes]]
) -> None:
    ns = netns("lk")
    first = holders(ns, "etcd prefix /coreos.com/network")
    result = take(ns)
    assert result.returncode == 1
    assert result.stdout == (
        f"another cloudroutes agent (pid {first.pid}, etcd prefix /coreos.com/network) already "
        "manages the routes of protocol 157 in this network namespace; stop it before starting "
        "this one\n"
    )


def test_other_namespaces_do_not_collide(
    netns: Callable[[str], Netns], holders: Callable[[Netns, str], subprocess.Popen[bytes]]
) -> None:
    holders(netns("lk"), "first")
    assert take(netns("lk")).stdout == "taken\n"


def test_a_killed_holder_leaves_no_stale_lock(
    netns: Callable[[str], Netns], holders: Callable[[Netns, str], subprocess.Popen[bytes]]
) -> None:
    ns = netns("lk")
    first = holders(ns, "first")
    assert take(ns).returncode == 1
    stop_process(first, kill=True)
    assert take(ns).stdout == "taken\n"


def test_release_frees_the_lock_in_process(netns: Callable[[str], Netns]) -> None:
    ns = netns("lk")
    script = (
        "from cloudroutes.node_lock import take_node_lock\n"
        "take_node_lock(157, 'a').release()\n"
        "take_node_lock(157, 'b')\n"
        "print('again')\n"
    )
    assert ns.run(sys.executable, "-c", script).stdout == "again\n"


def test_a_holder_of_another_user_is_named_with_its_user_id(
    netns: Callable[[str], Netns], holders: Callable[[Netns, str], subprocess.Popen[bytes]]
) -> None:
    ns = netns("lk")
    squatter = ns.popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         "import socket, signal\n"
         "s = socket.socket(socket.AF_UNIX)\n"
         "s.bind(b'\\0cloudroutes.rtproto.157'); s.listen(1)\n"
         "print('held', flush=True); signal.pause()\n"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == b"held\n"
        assert take(ns).stdout.startswith(
            f"another cloudroutes agent (pid {squatter.pid}, user id 65534) already manages"
        )
    finally:
        stop_process(squatter, kill=True)
