"""One agent per network namespace and route protocol.

Two agents in one network namespace (with the same etcd prefix or not) would both program
routes of protocol 157 and each remove the other's as stale. The lock is an abstract unix
socket named after the protocol: abstract names live in the network namespace's own table, so
agents of other namespaces (containers, the lab's nodes) never collide, and the kernel frees
the name when its holder dies, also by kill -9, so no stale lock can block a restart.

The holder answers each connection with one line describing itself; a refused agent shows it,
with the holder's pid from the socket's peer credentials.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading

from cloudroutes.errors import ConfigError

# The rt protocol of every route cloudroutes writes (providers/kernel.py RTPROT_CLOUDROUTES):
# the thing two agents in one namespace would fight over.
ROUTE_PROTOCOL = 157

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_DESCRIPTION_MAX = 200


def lock_name(protocol: int) -> bytes:
    """The abstract socket name for ``protocol`` (the leading NUL makes it abstract)."""
    return b"\0cloudroutes.rtproto." + str(protocol).encode()


class NodeLock:
    """Held while the process lives or until release(); take it with take_node_lock()."""

    def __init__(self, sock: socket.socket, protocol: int, description: str) -> None:
        self.protocol = protocol
        self._sock = sock
        self._line = (description[:_DESCRIPTION_MAX].replace("\n", " ") + "\n").encode()
        self._thread = threading.Thread(target=self._answer, name="node-lock", daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # released
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(self._line)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._sock.close()
        self._thread.join(timeout=2)


def take_node_lock(protocol: int, description: str) -> NodeLock:
    """Take the lock of ``protocol`` in this network namespace, or refuse in one line.

    ``description`` (no secrets: any process in the namespace may read it) tells a refused
    agent who holds the lock, e.g. ``etcd prefix /coreos.com/network``.
    """
    name = lock_name(protocol)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(8)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(
                f"cannot take the node lock {name[1:].decode()} (an abstract unix socket): "
                f"{exc.strerror}"
            ) from None
        raise ConfigError(
            f"another cloudroutes agent ({describe_holder(protocol)}) already manages the routes "
            f"of protocol {protocol} in this network namespace; stop it before starting this one"
        ) from None
    return NodeLock(sock, protocol, description)


def describe_holder(protocol: int, timeout: float = 1.0) -> str:
    """``pid 1234, etcd prefix /x`` for the lock's holder, as much as can be learnt."""
    pid = uid = 0
    said = ""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(lock_name(protocol))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, _ = _PEERCRED.unpack(creds)
            said = _printable(sock.recv(_DESCRIPTION_MAX + 1))
        except OSError:
            pass  # a holder that is exiting or hung: say what is known
    # 0: the holder is in a pid namespace this process cannot see into.
    who = f"pid {pid}" if pid else "pid unknown"
    if pid and uid != os.getuid():
        # Any local user can bind an abstract name: show who, in case it is not an agent.
        who += f", user id {uid}"
    return f"{who}, {said}" if said else who


def _printable(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return "".join(ch for ch in text if ch.isprintable())[:_DESCRIPTION_MAX]
